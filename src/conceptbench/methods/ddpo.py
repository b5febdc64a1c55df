"""DDPO: fine-tune the U-Net (or a LoRA on it) with PPO on a reward (Black et al. 2023).

Denoising is an MDP: a state is (prompt, t, x_t), an action the DDIM (eta = 1) step to x_{t-1}, whose
Gaussian log-probability ddim_step_with_logprob gives. Every `inner_epochs` training steps the current
policy samples a batch of trajectories with classifier-free guidance; their final images are scored by
the reward (the LAION aesthetic predictor by default) and normalised per prompt into advantages, and each
training step minimises the clipped PPO surrogate over the batch's (sample, timestep) pairs. With
gradient_accumulation_steps = m the pairs are split into m micro-batches (ddpo-pytorch accumulates
over timesteps the same way). The method makes its own data: no dataset.

Advantages, as ddpo-pytorch's per-prompt stat tracking: each prompt keeps its last `stat_buffer_size`
rewards across epochs (default 16, as ddpo-pytorch); once that buffer holds `stat_min_count` (default
16) a sample's advantage is (r − mean) / std over its prompt's buffer, before that over the whole
batch. In the study (8 samples per prompt per epoch) one epoch alone gives a noisy std; 16 is this
epoch's and the last one's. stat_buffer_size 0 uses this epoch's samples of the prompt only
(stat_min_count 2 gives the per-batch normalisation of earlier versions). The history is part of the
checkpoint, so a resume is exact.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .. import runtime
from ..train.method import (Method, MethodError, TrainContext, assemble_pipeline, base_pipeline, encode_prompts,
                            load_base_pipeline)
from ._lora import add_lora, fuse_loras, save_lora
from ._policy import RewardStats, guided_noise, ppo_loss, sample_trajectories, ddim_step_with_logprob
from ._rewards import make_reward

log = logging.getLogger(__name__)

ARGS = {  # one JSON-schema fragment per argument (conceptbench/registry.py); no default: required
    "prompts": {"type": ["array", "string"], "items": {"type": "string"}, "minItems": 1, "default": "animals",
                "description": "Training prompts: a list, or the name of a built-in set (animals)."},
    "reward": {"enum": ["aesthetic", "brightness"], "default": "aesthetic",
               "description": "What the samples are scored by: the LAION aesthetic head, or mean brightness (tests)."},
    "sample_steps": {"type": "integer", "minimum": 1, "default": 50, "description": "DDIM steps per trajectory."},
    "eta": {"type": "number", "exclusiveMinimum": 0, "default": 1.0, "description": "DDIM η (> 0: stochastic)."},
    "guidance_scale": {"type": "number", "minimum": 0, "default": 5.0, "description": "CFG scale of the trajectories."},
    "samples_per_prompt": {"type": "integer", "minimum": 1, "default": 4,
                           "description": "Trajectories per prompt per epoch."},
    "prompts_per_epoch": {"type": ["integer", "null"], "minimum": 1, "default": None,
                          "description": "Prompts drawn per epoch; null: all of them."},
    "inner_epochs": {"type": "integer", "minimum": 1, "default": 1,
                     "description": "PPO updates (training steps) per batch of trajectories."},
    "clip_range": {"type": "number", "exclusiveMinimum": 0, "default": 1.0e-4, "description": "PPO's ratio clip ε."},
    "adv_clip_max": {"type": "number", "exclusiveMinimum": 0, "default": 5.0, "description": "Advantage clip, ±."},
    "timestep_fraction": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 1.0,
                          "description": "Share of each trajectory's timesteps trained on."},
    "stat_buffer_size": {"type": "integer", "minimum": 0, "default": 16,
                         "description": "Rewards kept per prompt across epochs for advantages; 0: this epoch's."},
    "stat_min_count": {"type": "integer", "minimum": 1, "default": 16,
                       "description": "Rewards a prompt's buffer needs before its own statistics are used."},
    "use_lora": {"type": "boolean", "default": False, "description": "Train a LoRA on the U-Net instead of all of it."},
    "lora_rank": {"type": "integer", "minimum": 1, "default": 4, "description": "Rank of that LoRA."},
}
# The aesthetic reward scores samples with the evaluation's CLIP and aesthetic head.
INPUTS = {"clip": {"reward": "aesthetic"}, "aesthetic": {"reward": "aesthetic"}}
H100_SECONDS_PER_STEP = 240.0  # one epoch: sampling the trajectories, scoring them, the PPO update

# Simple animal prompts, as in ddpo-pytorch's "simple_animals" prompt function.
PROMPT_SETS = {"animals": ["cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer",
                           "cow", "goat", "lion", "tiger", "bear", "raccoon", "fox", "wolf", "lizard", "beetle",
                           "ant", "butterfly", "fish", "shark", "whale", "dolphin", "squirrel", "mouse", "rat",
                           "snake", "turtle", "frog", "chicken", "duck", "goose", "bee", "pig", "turkey", "llama"]}


def prompt_list(value) -> list[str]:
    """args.prompts: a list of prompts or the name of a built-in set."""
    if isinstance(value, str):
        if value not in PROMPT_SETS:
            raise MethodError(f"ddpo: args.prompts {value!r} is neither a list nor a known set ({sorted(PROMPT_SETS)})")
        return list(PROMPT_SETS[value])
    if not value or not all(isinstance(p, str) for p in value):
        raise MethodError("ddpo: args.prompts must be a non-empty list of strings or a set name")
    return list(value)


def reward_stats(buffer_size: int, min_count: int, samples_per_prompt: int) -> RewardStats:
    """args.stat_buffer_size / stat_min_count, checked against what one epoch puts in a buffer."""
    if buffer_size < 0 or min_count < 1:
        raise MethodError(f"ddpo: args.stat_buffer_size must be >= 0 and args.stat_min_count >= 1 "
                          f"(got {buffer_size}, {min_count})")
    if 0 < buffer_size < samples_per_prompt:
        raise MethodError(f"ddpo: args.stat_buffer_size {buffer_size} is below args.samples_per_prompt "
                          f"{samples_per_prompt}: the buffer would drop part of an epoch's own samples")
    if buffer_size and min_count > buffer_size:
        raise MethodError(f"ddpo: args.stat_min_count {min_count} exceeds args.stat_buffer_size {buffer_size}: "
                          "the buffer's statistics would never be used")
    return RewardStats(buffer_size, min_count)


class DDPO(Method):
    name = "ddpo"

    def setup(self, ctx: TrainContext) -> None:
        from diffusers import DDIMScheduler

        self.prompts = prompt_list(self.arg("prompts"))
        self.eta = float(self.arg("eta"))
        self.guidance = float(self.arg("guidance_scale"))
        self.per_prompt = int(self.arg("samples_per_prompt"))
        self.n_prompts = min(int(self.arg("prompts_per_epoch") or len(self.prompts)), len(self.prompts))
        self.inner_epochs = int(self.arg("inner_epochs"))
        self.clip_range, self.adv_clip_max = float(self.arg("clip_range")), float(self.arg("adv_clip_max"))
        self.timestep_fraction = float(self.arg("timestep_fraction"))
        self.use_lora = self.arg("use_lora")
        self.accum = int(ctx.train["gradient_accumulation_steps"])
        self.device, self.seed = ctx.device, ctx.seed
        if self.inner_epochs < 1 or self.per_prompt < 1:
            raise MethodError("ddpo: args.inner_epochs and args.samples_per_prompt must be at least 1")
        self.stats = reward_stats(int(self.arg("stat_buffer_size")), int(self.arg("stat_min_count")),
                                  self.per_prompt)
        self.reward_name = self.arg("reward")
        self.reward = make_reward(self.reward_name, ctx.inputs, ctx.device, ctx.model_options)

        frozen = runtime.precision_dtype(ctx.mixed_precision) or torch.float32
        pipe = base_pipeline(ctx, dtype=frozen if self.use_lora else torch.float32)
        self.tokenizer, self.text_encoder, self.vae, self.unet = pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet
        self.sample_scheduler = pipe.scheduler
        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.scheduler.set_timesteps(int(self.arg("sample_steps")), device=ctx.device)
        for m in (self.vae, self.text_encoder):
            m.requires_grad_(False).eval().to(ctx.device)
        if self.use_lora:
            self.params = add_lora(self.unet, int(self.arg("lora_rank")))
        else:
            self.params = list(self.unet.requires_grad_(True).parameters())
        self.unet.to(ctx.device).train()
        if ctx.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        with torch.no_grad():
            self.cond = encode_prompts(self.tokenizer, self.text_encoder, self.prompts)
            self.uncond = encode_prompts(self.tokenizer, self.text_encoder, [""])
        size = ctx.resolution // self.vae_scale
        self.latent_shape = (self.unet.config.in_channels, size, size)
        self.buffer, self.buffer_epoch, self.rewards = None, -1, []
        self._step, self._micro, self._chunks = -1, 0, None

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def param_groups(self) -> list[dict]:
        return [{"params": self.params}]

    @torch.no_grad()
    def collect(self, epoch: int, generator: torch.Generator) -> dict:
        """Sample this epoch's trajectories with the current policy, score them, compute advantages."""
        order = torch.randperm(len(self.prompts), generator=generator)[: self.n_prompts]
        ids = order.repeat_interleave(self.per_prompt)
        traj = sample_trajectories(self.unet, self.scheduler, self.cond[ids.to(self.device)], self.uncond,
                                   self.latent_shape, self.guidance, self.eta, generator)
        x0 = traj["latents"][:, -1]
        images = self.vae.decode(x0.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        images = (images.float() / 2 + 0.5).clamp(0, 1)
        texts = [self.prompts[i] for i in ids]
        rewards = self.reward(images, texts).float().cpu()
        self.rewards.append([epoch, rewards.mean().item(), rewards.std(unbiased=False).item()])
        log.info("ddpo epoch %d: mean reward %.5g over %d samples", epoch, rewards.mean().item(), len(rewards))
        return dict(latents=traj["latents"], log_probs=traj["log_probs"], timesteps=traj["timesteps"],
                    advantages=self.stats.advantages(rewards, texts).to(self.device), prompt_ids=ids.to(self.device))

    def batch(self, step: int, generator: torch.Generator) -> dict:
        """This micro-batch's (sample, timestep) pairs; new trajectories at the start of each epoch."""
        if step != self._step:  # the loop calls batch() gradient_accumulation_steps times per step
            self._step, self._micro = step, 0
            epoch = step // self.inner_epochs
            if self.buffer_epoch != epoch:
                self.buffer, self.buffer_epoch = self.collect(epoch, generator), epoch
            n, steps = self.buffer["log_probs"].shape
            keep = max(1, int(round(steps * self.timestep_fraction)))
            slots = torch.argsort(torch.rand(n, steps, generator=generator), dim=1)[:, :keep]  # timesteps per sample
            pairs = torch.stack([torch.arange(n).repeat_interleave(keep), slots.reshape(-1)], dim=1)
            pairs = pairs[torch.randperm(len(pairs), generator=generator)]
            self._chunks = torch.tensor_split(pairs, min(self.accum, len(pairs)))
        else:
            self._micro += 1
        return {"pairs": self._chunks[self._micro % len(self._chunks)].to(self.device)}

    def loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        buf, (i, j) = self.buffer, batch["pairs"].unbind(1)
        x, x_next = buf["latents"][i, j], buf["latents"][i, j + 1]
        t = buf["timesteps"][j]
        out = guided_noise(self.unet, x, t, self.cond[buf["prompt_ids"][i]], self.uncond, self.guidance)
        _, log_prob = ddim_step_with_logprob(self.scheduler, out, t, x, self.eta, prev_sample=x_next)
        return ppo_loss(log_prob, buf["log_probs"][i, j], buf["advantages"][i], self.clip_range, self.adv_clip_max)

    def state_dict(self) -> dict:
        return {"buffer": self.buffer or {}, "buffer_epoch": self.buffer_epoch, "rewards": self.rewards,
                "reward_stats": self.stats.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.buffer = {k: v.to(self.device) for k, v in state["buffer"].items()} or None
        self.buffer_epoch, self.rewards = int(state["buffer_epoch"]), [list(r) for r in state["rewards"]]
        if "reward_stats" in state:
            self.stats.load_state_dict(state["reward_stats"])
        else:
            log.warning("ddpo: the checkpoint has no reward history (written before it was kept): it starts empty")

    def save(self, artifact_dir: Path) -> None:
        if self.use_lora:
            save_lora(self.unet, artifact_dir)
        else:
            assemble_pipeline(self.vae, self.text_encoder, self.tokenizer, self.unet,
                              self.sample_scheduler).save_pretrained(str(artifact_dir), safe_serialization=True)
        rows = [dict(epoch=e, mean=m, std=s) for e, m, s in self.rewards]
        (Path(artifact_dir) / "rewards.json").write_text(json.dumps({"reward": self.reward_name, "epochs": rows}, indent=1))

    @classmethod
    def load_pipeline(cls, artifact_dir: Path, base_model: Path, spec: dict,
                      device: torch.device, dtype: torch.dtype = torch.float32):
        from diffusers import StableDiffusionPipeline

        if cls.resolved_args(spec.get("args"))["use_lora"]:
            pipe = fuse_loras(load_base_pipeline(base_model, dtype=dtype), [(Path(artifact_dir), 1.0)])
        else:
            pipe = StableDiffusionPipeline.from_pretrained(str(artifact_dir), safety_checker=None,
                                                           requires_safety_checker=False, dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)


METHOD = DDPO
