"""Textual Inversion: learn N embedding vectors for one placeholder; the whole model stays frozen.

The placeholder ("<sks-cat>") becomes N tokens "<sks-cat>", "<sks-cat>_1", ... initialised from
`initializer_token` (Gal et al. 2023; the multi-vector naming and the file format are those of
diffusers' examples/textual_inversion). Only those rows train (methods/_tokens.py). The artifact is
learned_embeds.safetensors, {placeholder: [N, D]}, which `pipe.load_textual_inversion` reads; the
pipeline then expands the placeholder in every prompt into its N tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..train.method import (
    ImageLatents,
    Method,
    assemble_pipeline,
    MethodError,
    TrainContext,
    base_pipeline,
    load_base_pipeline,
    load_image_folder,
    noise_and_target,
    offload,
    tokenize,
)
from ._tokens import TrainableTokens, expand, vector_names

WEIGHT_NAME = "learned_embeds.safetensors"

ARGS = {  # one JSON-schema fragment per argument (conceptbench/registry.py); no default: required
    "placeholder_token": {"type": "string", "minLength": 1, "description": "The new word, e.g. '<sks-cat>'."},
    "initializer_token": {"type": "string", "minLength": 1,
                          "description": "The word the vectors start from (several tokens: their mean)."},
    "num_vectors": {"type": "integer", "minimum": 1, "default": 1, "description": "N, vectors behind the placeholder."},
    "instance_prompt": {"type": ["string", "null"], "default": None,
                        "description": "The training prompt, with the placeholder; null: 'a photo of <placeholder>'."},
}
INPUTS = {"data": True}
H100_SECONDS_PER_STEP = 0.5


class TextualInversion(Method):
    name = "textual_inversion"

    def setup(self, ctx: TrainContext) -> None:
        from diffusers import DDPMScheduler

        self.token = self.arg("placeholder_token")
        self.n = int(self.arg("num_vectors"))
        prompt = self.arg("instance_prompt") or f"a photo of {self.token}"
        if self.token not in prompt:
            raise MethodError(f"{self.name}: args.instance_prompt {prompt!r} lacks the placeholder {self.token!r}")
        if ctx.data_dir is None:
            raise MethodError(f"{self.name}: needs a folder of instance images")
        self.device, self.batch_size = ctx.device, ctx.batch_size

        pipe = base_pipeline(ctx)
        self.tokenizer, self.text_encoder, self.vae = pipe.tokenizer, pipe.text_encoder, pipe.vae
        self.unet, self.sample_scheduler = pipe.unet, pipe.scheduler
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        for module in (self.vae, self.text_encoder, self.unet):
            module.requires_grad_(False).eval()
        initializer = self.arg("initializer_token")
        self.tokens = TrainableTokens(self.tokenizer, self.text_encoder, vector_names(self.token, self.n),
                                      [initializer] * self.n, self.name)

        self.instance = ImageLatents(self.vae, load_image_folder(ctx.data_dir, ctx.resolution), ctx.device,
                                     ctx.random_flip)
        offload(self.vae)
        self.prompt_ids = tokenize(self.tokenizer, [expand(prompt, self.token, self.n)]).to(ctx.device)
        self.text_encoder.to(ctx.device)
        self.tokens.to(ctx.device)
        self.unet.to(ctx.device)
        if ctx.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()

    def param_groups(self) -> list[dict]:
        return [{"params": [self.tokens.vectors]}]

    def batch(self, step: int, generator: torch.Generator) -> dict:
        latents = self.instance.draw(self.batch_size, generator)
        noisy, timesteps, target = noise_and_target(self.noise_scheduler, latents, generator)
        return dict(noisy=noisy, timesteps=timesteps, target=target)

    def loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        cond = self.text_encoder(self.prompt_ids.expand(batch["noisy"].shape[0], -1))[0]
        pred = self.unet(batch["noisy"], batch["timesteps"], cond).sample
        return F.mse_loss(pred.float(), batch["target"].float())

    def pipeline(self):
        """The trained pipeline in memory: the base models with the trained rows written in."""
        self.tokens.write_rows()
        return assemble_pipeline(self.vae.to(self.device), self.text_encoder, self.tokenizer, self.unet,
                                 self.sample_scheduler)

    def save(self, artifact_dir: Path) -> None:
        from safetensors.torch import save_file

        save_file({self.token: self.tokens.vectors.detach().cpu().contiguous()}, str(Path(artifact_dir) / WEIGHT_NAME))

    @classmethod
    def load_pipeline(cls, artifact_dir: Path, base_model: Path, spec: dict,
                      device: torch.device, dtype: torch.dtype = torch.float32):
        pipe = load_base_pipeline(base_model, dtype=dtype)
        pipe.load_textual_inversion(str(artifact_dir), weight_name=WEIGHT_NAME)
        return pipe.to(device)

    @classmethod
    def base_prompt(cls, row: dict, args: dict) -> str:
        """The placeholder read as its initializer word ("<sks-cat> in a basket" -> "toy in a basket"):
        the untrained embedding is that word's, so this is the method before its first step."""
        return row["prompt"].replace(args["placeholder_token"], args["initializer_token"])


METHOD = TextualInversion
