"""BitFit: train only the U-Net's bias terms (Ben Zaken et al. 2022; DiffFit, Xie et al. 2023, for diffusion).

A seventh method added the way a researcher adds one outside the package: this module, a test and
config entries, nothing else (tests/test_registry.py, tests/test_workflow.py). The artifact holds the
trained biases (biases.safetensors); sampling loads them into the base pipeline's U-Net.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from conceptbench.train.method import (Method, MethodError, TrainContext, base_pipeline, encode_latent_distribution,
                                       encode_prompts, load_base_pipeline, load_image_folder, noise_and_target,
                                       offload, sample_latents)

ARGS = {
    "instance_prompt": {"type": "string", "minLength": 1, "description": "The prompt bound to the subject."},
    "train_norms": {"type": "boolean", "default": False, "description": "Also train the normalisation layers' scales."},
}
INPUTS = {"data": True}
H100_SECONDS_PER_STEP = 0.5
WEIGHT_NAME = "biases.safetensors"


def trainable(name: str, train_norms: bool) -> bool:
    return name.endswith(".bias") or (train_norms and "norm" in name and name.endswith(".weight"))


class BitFit(Method):
    name = "bitfit"

    def setup(self, ctx: TrainContext) -> None:
        from diffusers import DDPMScheduler

        if ctx.data_dir is None:
            raise MethodError(f"{self.name}: needs a folder of instance images")
        pipe = base_pipeline(ctx)
        self.unet, self.device, self.batch_size = pipe.unet, ctx.device, ctx.batch_size
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        for module in (pipe.vae, pipe.text_encoder, self.unet):
            module.requires_grad_(False).eval()
        self.names = [n for n, _ in self.unet.named_parameters() if trainable(n, self.arg("train_norms"))]
        for name in self.names:
            self.unet.get_parameter(name).requires_grad_(True)
        self.instance = encode_latent_distribution(pipe.vae, load_image_folder(ctx.data_dir, ctx.resolution), ctx.device)
        offload(pipe.vae)
        with torch.no_grad():
            self.cond = encode_prompts(pipe.tokenizer, pipe.text_encoder.to(ctx.device), [self.arg("instance_prompt")])
        self.unet.to(ctx.device).train()

    def param_groups(self) -> list[dict]:
        return [{"params": [self.unet.get_parameter(n) for n in self.names]}]

    def batch(self, step: int, generator: torch.Generator) -> dict:
        mean, std = self.instance
        idx = torch.randint(0, mean.shape[0], (self.batch_size,), generator=generator).to(mean.device)
        noisy, timesteps, target = noise_and_target(self.noise_scheduler, sample_latents(mean[idx], std[idx], generator),
                                                    generator)
        return dict(noisy=noisy, timesteps=timesteps, target=target)

    def loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        cond = self.cond.expand(batch["noisy"].shape[0], -1, -1)
        return F.mse_loss(self.unet(batch["noisy"], batch["timesteps"], cond).sample.float(), batch["target"].float())

    def save(self, artifact_dir: Path) -> None:
        from safetensors.torch import save_file

        save_file({n: self.unet.get_parameter(n).detach().cpu().contiguous() for n in self.names},
                  str(Path(artifact_dir) / WEIGHT_NAME))

    @classmethod
    def load_pipeline(cls, artifact_dir: Path, base_model: Path, spec: dict,
                      device: torch.device, dtype: torch.dtype = torch.float32):
        from safetensors.torch import load_file

        pipe = load_base_pipeline(base_model, dtype=dtype)
        unexpected = pipe.unet.load_state_dict(load_file(str(Path(artifact_dir) / WEIGHT_NAME)), strict=False).unexpected_keys
        if unexpected:
            raise MethodError(f"bitfit: {WEIGHT_NAME} names tensors the U-Net lacks: {unexpected[:3]}")
        return pipe.to(device)


METHOD = BitFit
