"""LCM distillation: a few-step student U-Net distilled from the base model (Luo et al. 2023).

The student is the teacher's U-Net plus a guidance-scale embedding (time_cond_proj_dim; its new
projection starts at zero, so the student starts as the teacher). Each step: noise a latent to a
timestep t_n of a 50-step DDIM grid, let the teacher (with CFG at a random w in [w_min, w_max]) take
one DDIM ODE step to t_{n-k} (k = skipping step), and pull the student's boundary-conditioned
consistency output at t_n towards the EMA target's at t_{n-k}, with an L2 or pseudo-Huber loss. The
recipe follows diffusers' examples/consistency_distillation/train_lcm_distill_sd_wds.py; its pieces
live here as small functions. The artifact is the EMA U-Net plus an LCMScheduler config; sampling
puts both on the base pipeline and runs 4 steps.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..train.method import Method, MethodError, TrainContext, encode_prompts
from ._captioned import EncodedCaptions, draw_encoded, load_captioned

SIGMA_DATA = 0.5

ARGS = {  # one JSON-schema fragment per argument (conceptbench/registry.py); no default: required
    "loss_type": {"enum": ["l2", "huber"], "default": "l2", "description": "Distance between student and target."},
    "huber_c": {"type": "number", "exclusiveMinimum": 0, "default": 0.001, "description": "Pseudo-Huber's c."},
    "num_ddim_timesteps": {"type": "integer", "minimum": 1, "default": 50,
                           "description": "Steps of the teacher's DDIM grid (the skipping step k is 1000 / this)."},
    "w_min": {"type": "number", "minimum": 0, "default": 5.0, "description": "Lowest guidance scale w drawn."},
    "w_max": {"type": "number", "minimum": 0, "default": 15.0, "description": "Highest guidance scale w drawn."},
    "ema_decay": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.95,
                  "description": "Decay of the EMA target U-Net."},
    "time_cond_proj_dim": {"type": "integer", "minimum": 2, "default": 256,
                           "description": "Width of the student's guidance-scale embedding."},
    "timestep_scaling": {"type": "number", "exclusiveMinimum": 0, "default": 10.0,
                         "description": "Scale of t in the boundary conditions c_skip, c_out."},
    "cache_latents": {"type": "boolean", "default": False,
                      "description": "Encode every image and caption once at setup (a small set trained for many "
                                     "steps); false: each batch, as the reference does on CC12M."},
}
INPUTS = {"data": True}
H100_SECONDS_PER_STEP = 1.5


def pseudo_huber_loss(pred: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """mean(sqrt((pred - target)² + c²) - c): quadratic for small errors, linear for large ones."""
    return torch.mean(torch.sqrt((pred.float() - target.float()) ** 2 + c**2) - c)


def guidance_scale_embedding(w: torch.Tensor, dim: int = 256, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sinusoidal features of 1000·w ([N] -> [N, dim]), the embedding diffusers' pipelines feed to timestep_cond."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=dtype) * -(math.log(10000.0) / (half - 1)))
    angles = (w.float() * 1000.0).to(dtype)[:, None] * freqs[None, :].to(w.device)
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def boundary_scalings(t: torch.Tensor, sigma_data: float = SIGMA_DATA, timestep_scaling: float = 10.0):
    """(c_skip, c_out) of the consistency parametrisation f(x, t) = c_skip·x + c_out·x̂₀; f(x, 0) = x."""
    s = t.float() * timestep_scaling
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s / (s**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def ddim_grid(num_train_timesteps: int, num_ddim_timesteps: int) -> torch.Tensor:
    """The solver's timesteps [k-1, 2k-1, ..., T-1] with skipping step k = T // num_ddim_timesteps."""
    k = num_train_timesteps // num_ddim_timesteps
    return torch.arange(1, num_ddim_timesteps + 1) * k - 1


def predicted_x0_eps(model_output, t, sample, alphas_cumprod, prediction_type: str):
    """(x̂₀, ε̂) from a model output at per-sample timesteps t."""
    a = alphas_cumprod.to(sample.device)[t].float().view(-1, *[1] * (sample.ndim - 1))
    out, x = model_output.float(), sample.float()
    if prediction_type == "epsilon":
        return (x - (1 - a).sqrt() * out) / a.sqrt(), out
    if prediction_type == "v_prediction":
        return a.sqrt() * x - (1 - a).sqrt() * out, a.sqrt() * out + (1 - a).sqrt() * x
    raise ValueError(f"unsupported prediction_type {prediction_type!r} (expected epsilon or v_prediction)")


def ddim_solver_step(x0: torch.Tensor, eps: torch.Tensor, alpha_prev: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step to the timestep with cumulative alpha `alpha_prev` (per sample)."""
    a = alpha_prev.float().view(-1, *[1] * (x0.ndim - 1))
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


class LCM(Method):
    name = "lcm"

    def setup(self, ctx: TrainContext) -> None:
        from diffusers import DDPMScheduler, UNet2DConditionModel

        self.loss_type = self.arg("loss_type")
        if self.loss_type not in ("l2", "huber"):
            raise MethodError(f"lcm: args.loss_type must be 'l2' or 'huber', got {self.loss_type!r}")
        self.huber_c = float(self.arg("huber_c"))
        self.w_min, self.w_max = float(self.arg("w_min")), float(self.arg("w_max"))
        self.ema_decay = float(self.arg("ema_decay"))
        self.cond_dim = int(self.arg("time_cond_proj_dim"))
        self.timestep_scaling = float(self.arg("timestep_scaling"))
        self.num_ddim = int(self.arg("num_ddim_timesteps"))
        self.device, self.batch_size, self.flip = ctx.device, ctx.batch_size, ctx.random_flip
        self.data, pipe = load_captioned(self.name, ctx)
        self.tokenizer, self.text_encoder, self.vae = pipe.tokenizer, pipe.text_encoder, pipe.vae
        self.base_scheduler_config = pipe.scheduler.config
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(ctx.device)
        self.grid = ddim_grid(self.scheduler.config.num_train_timesteps, self.num_ddim).to(ctx.device)
        self.skip = self.scheduler.config.num_train_timesteps // self.num_ddim
        for m in (self.vae, self.text_encoder, pipe.unet):
            m.requires_grad_(False).eval().to(ctx.device)
        self.teacher = pipe.unet

        self.student = UNet2DConditionModel.from_config({**self.teacher.config, "time_cond_proj_dim": self.cond_dim})
        missing, unexpected = self.student.load_state_dict(self.teacher.state_dict(), strict=False)
        if unexpected or any("cond_proj" not in k for k in missing):
            raise MethodError(f"lcm: the student U-Net does not match the teacher (missing {missing}, "
                              f"unexpected {unexpected})")
        torch.nn.init.zeros_(self.student.time_embedding.cond_proj.weight)
        self.student.float().to(ctx.device).train().requires_grad_(True)
        self.target = copy.deepcopy(self.student).requires_grad_(False).eval()
        if ctx.gradient_checkpointing:
            self.student.enable_gradient_checkpointing()
        with torch.no_grad():
            self.uncond = encode_prompts(self.tokenizer, self.text_encoder, [""])
        self.encoded = None  # or every image and caption encoded once (draw_encoded: the same draws either way)
        if self.arg("cache_latents"):
            self.encoded = EncodedCaptions(self.data, self.vae, self.tokenizer, self.text_encoder, ctx.device,
                                           flip=self.flip)

    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.student.parameters() if p.requires_grad]}]

    def _consistency(self, unet, x, t, w_emb, cond):
        """c_skip(t)·x + c_out(t)·x̂₀ from `unet`'s prediction at (x, t)."""
        out = unet(x, t, cond, timestep_cond=w_emb).sample
        x0, _ = predicted_x0_eps(out, t, x, self.alphas_cumprod, self.scheduler.config.prediction_type)
        c_skip, c_out = boundary_scalings(t, timestep_scaling=self.timestep_scaling)
        shape = (-1, *[1] * (x.ndim - 1))
        return c_skip.view(shape) * x.float() + c_out.view(shape) * x0

    def batch(self, step: int, generator: torch.Generator) -> dict:
        """Noisy latents at t_n, the guidance embedding, and the EMA target's output after the teacher's DDIM step."""
        latents, cond = draw_encoded(self.data, self.encoded, self.vae, self.tokenizer, self.text_encoder,
                                     self.batch_size, generator, self.flip)
        n, dev = latents.shape[0], self.device
        noise = torch.randn(latents.shape, generator=generator).to(dev)
        index = torch.randint(0, self.num_ddim, (n,), generator=generator).to(dev)
        w = (torch.rand(n, generator=generator) * (self.w_max - self.w_min) + self.w_min).to(dev)
        t_start = self.grid[index]
        t_prev = (t_start - self.skip).clamp(min=0)
        x_t = self.scheduler.add_noise(latents, noise, t_start)
        w_emb = guidance_scale_embedding(w, self.cond_dim).to(dev)

        kind = self.scheduler.config.prediction_type
        both = self.teacher(torch.cat([x_t, x_t]), torch.cat([t_start, t_start]),
                            torch.cat([cond, self.uncond.expand_as(cond)])).sample
        x0, eps = predicted_x0_eps(both, torch.cat([t_start, t_start]), torch.cat([x_t, x_t]), self.alphas_cumprod, kind)
        wv = w.view(-1, *[1] * (latents.ndim - 1))
        x0 = x0[:n] + wv * (x0[:n] - x0[n:])
        eps = eps[:n] + wv * (eps[:n] - eps[n:])
        x_prev = ddim_solver_step(x0, eps, self.alphas_cumprod[t_prev])
        target = self._consistency(self.target, x_prev.to(latents.dtype), t_prev, w_emb, cond)
        return dict(x_t=x_t, t=t_start, w_emb=w_emb, cond=cond, target=target.float())

    def loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        pred = self._consistency(self.student, batch["x_t"], batch["t"], batch["w_emb"], batch["cond"])
        if self.loss_type == "huber":
            return pseudo_huber_loss(pred, batch["target"], self.huber_c)
        return F.mse_loss(pred.float(), batch["target"])

    def after_step(self, step: int) -> None:
        for t, s in zip(self.target.parameters(), self.student.parameters()):
            t.lerp_(s.detach(), 1 - self.ema_decay)

    def state_dict(self) -> dict:
        return {"target": self.target.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.target.load_state_dict(state["target"])

    def save(self, artifact_dir: Path) -> None:
        from diffusers import LCMScheduler

        self.target.save_pretrained(str(Path(artifact_dir) / "unet"), safe_serialization=True)
        scheduler = LCMScheduler.from_config(self.base_scheduler_config, original_inference_steps=self.num_ddim,
                                             timestep_scaling=self.timestep_scaling)
        scheduler.save_pretrained(str(Path(artifact_dir) / "scheduler"))

    @classmethod
    def load_pipeline(cls, artifact_dir: Path, base_model: Path, spec: dict,
                      device: torch.device, dtype: torch.dtype = torch.float32):
        """The base pipeline with the distilled U-Net and LCMScheduler (guidance via the U-Net's w embedding)."""
        from diffusers import LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(str(Path(artifact_dir) / "unet"), dtype=dtype)
        scheduler = LCMScheduler.from_pretrained(str(Path(artifact_dir) / "scheduler"))
        pipe = StableDiffusionPipeline.from_pretrained(str(base_model), unet=unet, scheduler=scheduler,
                                                       safety_checker=None, requires_safety_checker=False, dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)


METHOD = LCM
