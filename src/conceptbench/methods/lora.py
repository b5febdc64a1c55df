"""LoRA: low-rank adapters on the U-Net's attention projections, trained on a captioned style set.

peft LoRA of rank r on to_q, to_k, to_v and to_out.0 (Hu et al. 2021; set-up as in diffusers'
examples/text_to_image/train_text_to_image_lora.py). The frozen U-Net, VAE and text encoder may be held
in fp16/bf16 while the adapter stays fp32. Optional Min-SNR-γ weighting (Hang et al. 2023). The
artifact is a diffusers LoRA file (save_lora_weights); sampling loads it on the base model with
load_lora_weights and fuses it, so inference costs what the base model costs. By default every image
and caption is encoded once at setup (cache_latents; _captioned.EncodedCaptions): the same draws as
encoding each batch, without the VAE and text encoder in the loop.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from ..train.method import Method, TrainContext, load_base_pipeline, noise_and_target, offload
from ._captioned import EncodedCaptions, draw_encoded, load_captioned
from ._lora import DEFAULT_TARGETS, add_lora, fuse_loras, save_lora

log = logging.getLogger(__name__)

ARGS = {  # one JSON-schema fragment per argument (conceptbench/registry.py); no default: required
    "rank": {"type": "integer", "minimum": 1, "description": "r, the adapter's rank."},
    "lora_alpha": {"type": ["number", "null"], "exclusiveMinimum": 0, "default": None,
                   "description": "α: the update is scaled by α/r; null: r (scale 1)."},
    "target_modules": {"type": ["array", "null"], "items": {"type": "string"}, "minItems": 1, "default": None,
                       "description": "Names of the U-Net's Linear layers to adapt; null: to_q, to_k, to_v, to_out.0."},
    "snr_gamma": {"type": ["number", "null"], "exclusiveMinimum": 0, "default": None,
                  "description": "γ of Min-SNR-γ loss weighting (Hang et al. 2023); null: plain MSE."},
    "lora_scale": {"type": "number", "default": 1.0, "description": "The adapter's weight when fused for sampling."},
    "cache_latents": {"type": "boolean", "default": True,
                      "description": "Encode every image and caption once at setup; false: each batch (huge sets)."},
}
INPUTS = {"data": True}
H100_SECONDS_PER_STEP = 0.5


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights min(SNR, γ)/SNR for ε-prediction, min(SNR, γ)/(SNR + 1) for v-prediction."""
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    raise ValueError(f"Min-SNR weighting: unsupported prediction_type {prediction_type!r}")


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) of each timestep."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1 - a)


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error; with `weights`, each sample's MSE is weighted before the batch mean."""
    if weights is None:
        return F.mse_loss(pred.float(), target.float())
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
    return (per_sample * weights).mean()


class LoRA(Method):
    name = "lora"

    def setup(self, ctx: TrainContext) -> None:
        from diffusers import DDPMScheduler

        self.rank = int(self.arg("rank"))
        self.snr_gamma = self.arg("snr_gamma")
        self.device, self.batch_size, self.flip = ctx.device, ctx.batch_size, ctx.random_flip
        self.data, pipe = load_captioned(self.name, ctx)
        self.tokenizer, self.text_encoder, self.vae, self.unet = pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.vae.requires_grad_(False).eval().to(ctx.device)
        self.text_encoder.requires_grad_(False).eval().to(ctx.device)
        self.params = add_lora(self.unet, self.rank, self.arg("lora_alpha"),
                               self.arg("target_modules") or DEFAULT_TARGETS)
        self.encoded = None
        if self.arg("cache_latents"):  # encode every image and caption once (see EncodedCaptions)
            self.encoded = EncodedCaptions(self.data, self.vae, self.tokenizer, self.text_encoder, ctx.device,
                                           flip=self.flip)
            log.info("lora: cached %d encoded images and captions (%.1f MB)", len(self.encoded),
                     self.encoded.nbytes() / 1e6)
            offload(self.vae, self.text_encoder)
        self.unet.to(ctx.device).train()
        if ctx.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()

    def param_groups(self) -> list[dict]:
        return [{"params": self.params}]

    def batch(self, step: int, generator: torch.Generator) -> dict:
        """batch_size random captioned images (mirrored at random with train.random_flip), encoded and noised
        at random timesteps."""
        latents, cond = draw_encoded(self.data, self.encoded, self.vae, self.tokenizer, self.text_encoder,
                                     self.batch_size, generator, self.flip)
        noisy, timesteps, target = noise_and_target(self.noise_scheduler, latents, generator)
        return dict(noisy=noisy, timesteps=timesteps, target=target, cond=cond)

    def loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        pred = self.unet(batch["noisy"], batch["timesteps"], batch["cond"]).sample
        weights = None
        if self.snr_gamma is not None:
            weights = min_snr_weights(snr(self.noise_scheduler.alphas_cumprod, batch["timesteps"]),
                                      float(self.snr_gamma), self.noise_scheduler.config.prediction_type)
        return weighted_mse(pred, batch["target"], weights)

    def save(self, artifact_dir: Path) -> None:
        save_lora(self.unet, artifact_dir)

    @classmethod
    def load_pipeline(cls, artifact_dir: Path, base_model: Path, spec: dict,
                      device: torch.device, dtype: torch.dtype = torch.float32):
        pipe = load_base_pipeline(base_model, dtype=dtype)
        fuse_loras(pipe, [(Path(artifact_dir), float(cls.resolved_args(spec.get("args"))["lora_scale"]))])
        return pipe.to(device)


METHOD = LoRA
