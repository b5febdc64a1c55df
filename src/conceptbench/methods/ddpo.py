"""DDPO: fine-tune the U-Net (or a LoRA on it) with PPO on a reward (Black et al. 2023), as trl's
examples/scripts/ddpo.py runs it (DDPOTrainer; its `use_lora` is the study's full-vs-LoRA switch).

Denoising is an MDP: a state is (prompt, t, x_t), an action the DDIM (eta = 1) step to x_{t-1}, whose
Gaussian log-probability ddim_step_with_logprob gives. One training step (`train.steps`) is one epoch:
the current policy samples `samples_per_epoch` trajectories with classifier-free guidance (in batches of
`sample_batch_size`), each from a training prompt (`prompts`, drawn at random per trajectory as trl's
prompt_fn does, or each prompt equally often); their final images are scored by the reward (the LAION
aesthetic predictor by default) and normalised into advantages; then, `inner_epochs` times, the
trajectories are shuffled and split into batches of `train_batch_size`, and each batch is one PPO update
of the clipped surrogate over its (trajectory, timestep) pairs, every kept timestep of every trajectory
accumulated (trl accumulates over timesteps the same way). An epoch thus makes samples_per_epoch /
train_batch_size × inner_epochs optimizer updates (`updates_per_step`); from the second on the policy
differs from the one that sampled, so the PPO ratio leaves 1 and the clip acts. The pairs of one update
are split over `train.gradient_accumulation_steps` micro-batches (memory only). The method makes its own
data: no dataset; its training prompts are its own, apart from the evaluation prompts.

Advantages, as trl's per-prompt stat tracking: each prompt keeps its last `stat_buffer_size` rewards
across epochs (trl's example: 32); once that buffer holds `stat_min_count` (16) a sample's advantage is
(r − mean) / std over its prompt's buffer, before that over the whole epoch. stat_buffer_size 0 uses this
epoch's samples of the prompt only. The history is part of the checkpoint, so a resume is exact.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
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
                "description": "Training prompts (not the evaluation prompts): a list, or a built-in set (animals: trl's 27)."},
    "prompt_draw": {"enum": ["random", "each"], "default": "random",
                    "description": "random: each trajectory's prompt drawn uniformly (trl's prompt_fn); each: every prompt equally often."},
    "reward": {"enum": ["aesthetic", "brightness"], "default": "aesthetic",
               "description": "What the samples are scored by: the LAION aesthetic head, or mean brightness (tests)."},
    "sample_steps": {"type": "integer", "minimum": 1, "default": 50, "description": "DDIM steps per trajectory."},
    "eta": {"type": "number", "exclusiveMinimum": 0, "default": 1.0, "description": "DDIM η (> 0: stochastic)."},
    "guidance_scale": {"type": "number", "minimum": 0, "default": 5.0, "description": "CFG scale of the trajectories and the PPO forward."},
    "samples_per_epoch": {"type": "integer", "minimum": 1, "default": 24,
                          "description": "Trajectories sampled per epoch (trl: sample_batch_size 6 × 4 batches)."},
    "sample_batch_size": {"type": "integer", "minimum": 1, "default": 6,
                          "description": "Trajectories sampled per U-Net batch (memory; trl: 6)."},
    "train_batch_size": {"type": "integer", "minimum": 1, "default": 3,
                         "description": "Trajectories per PPO update, all their timesteps accumulated (trl: 3)."},
    "inner_epochs": {"type": "integer", "minimum": 1, "default": 1,
                     "description": "Passes of PPO updates over each epoch's trajectories."},
    "clip_range": {"type": "number", "exclusiveMinimum": 0, "default": 1.0e-4, "description": "PPO's ratio clip ε."},
    "adv_clip_max": {"type": "number", "exclusiveMinimum": 0, "default": 5.0, "description": "Advantage clip, ±."},
    "timestep_fraction": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 1.0,
                          "description": "Share of each trajectory's timesteps trained on."},
    "stat_buffer_size": {"type": "integer", "minimum": 0, "default": 32,
                         "description": "Rewards kept per prompt across epochs for advantages; 0: this epoch's."},
    "stat_min_count": {"type": "integer", "minimum": 1, "default": 16,
                       "description": "Rewards a prompt's buffer needs before its own statistics are used."},
    "use_lora": {"type": "boolean", "default": False, "description": "Train a LoRA on the U-Net instead of all of it."},
    "lora_rank": {"type": "integer", "minimum": 1, "default": 4, "description": "Rank of that LoRA."},
}
# The aesthetic reward scores samples with the evaluation's CLIP and aesthetic head.
INPUTS = {"clip": {"reward": "aesthetic"}, "aesthetic": {"reward": "aesthetic"}}
# One step is one epoch at the defaults, 512²: 24 trajectories of 50 guided steps, their rewards, and 8
# updates over their 1,200 (trajectory, timestep) pairs, each a guided forward and backward; with margin.
H100_SECONDS_PER_STEP = 180.0

# trl examples/scripts/ddpo.py's training prompts: animal names, one drawn per trajectory.
PROMPT_SETS = {"animals": ["cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer",
                           "cow", "goat", "lion", "frog", "chicken", "duck", "goose", "bee", "pig", "turkey", "fly",
                           "llama", "camel", "bat", "gorilla", "hedgehog", "kangaroo"]}


def prompt_list(value) -> list[str]:
    """args.prompts: a list of prompts or the name of a built-in set."""
    if isinstance(value, str):
        if value not in PROMPT_SETS:
            raise MethodError(f"ddpo: args.prompts {value!r} is neither a list nor a known set ({sorted(PROMPT_SETS)})")
        return list(PROMPT_SETS[value])
    if not value or not all(isinstance(p, str) for p in value):
        raise MethodError("ddpo: args.prompts must be a non-empty list of strings or a set name")
    return list(value)


def epoch_shape(samples: int, train_batch: int, n_prompts: int, draw: str) -> int:
    """PPO updates per pass over an epoch's trajectories; refuses shapes that leave samples out."""
    if samples % train_batch:
        raise MethodError(f"ddpo: args.samples_per_epoch {samples} is not a multiple of args.train_batch_size "
                          f"{train_batch}: every trajectory belongs to one update")
    if draw == "each" and samples % n_prompts:
        raise MethodError(f"ddpo: args.prompt_draw 'each' needs args.samples_per_epoch ({samples}) to be a multiple "
                          f"of the number of args.prompts ({n_prompts})")
    return samples // train_batch


def reward_stats(buffer_size: int, min_count: int, per_prompt: int | None = None) -> RewardStats:
    """args.stat_buffer_size / stat_min_count, checked against what one epoch puts in a buffer (per_prompt:
    each prompt's samples per epoch, when fixed)."""
    if buffer_size < 0 or min_count < 1:
        raise MethodError(f"ddpo: args.stat_buffer_size must be >= 0 and args.stat_min_count >= 1 "
                          f"(got {buffer_size}, {min_count})")
    if per_prompt and 0 < buffer_size < per_prompt:
        raise MethodError(f"ddpo: args.stat_buffer_size {buffer_size} is below the {per_prompt} samples each prompt "
                          f"gets per epoch: the buffer would drop part of an epoch's own samples")
    if buffer_size and min_count > buffer_size:
        raise MethodError(f"ddpo: args.stat_min_count {min_count} exceeds args.stat_buffer_size {buffer_size}: "
                          "the buffer's statistics would never be used")
    return RewardStats(buffer_size, min_count)


def plan_generator(seed: int, epoch: int, inner: int) -> torch.Generator:
    """The generator of one pass's shuffle, a function of (seed, epoch, pass) alone, so a resume mid-epoch
    draws the same batches."""
    state = np.random.SeedSequence([seed, epoch, inner, 0xDD90]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class DDPO(Method):
    name = "ddpo"

    def setup(self, ctx: TrainContext) -> None:
        from diffusers import DDIMScheduler

        self.prompts = prompt_list(self.arg("prompts"))
        self.draw = self.arg("prompt_draw")
        self.eta = float(self.arg("eta"))
        self.guidance = float(self.arg("guidance_scale"))
        self.samples = int(self.arg("samples_per_epoch"))
        self.sample_batch = int(self.arg("sample_batch_size"))
        self.train_batch = int(self.arg("train_batch_size"))
        self.inner_epochs = int(self.arg("inner_epochs"))
        self.clip_range, self.adv_clip_max = float(self.arg("clip_range")), float(self.arg("adv_clip_max"))
        self.timestep_fraction = float(self.arg("timestep_fraction"))
        self.use_lora = self.arg("use_lora")
        self.accum = int(ctx.train["gradient_accumulation_steps"])
        self.device, self.seed = ctx.device, ctx.seed
        self.updates_per_epoch = epoch_shape(self.samples, self.train_batch, len(self.prompts), self.draw)
        per_prompt = self.samples // len(self.prompts) if self.draw == "each" else None
        self.stats = reward_stats(int(self.arg("stat_buffer_size")), int(self.arg("stat_min_count")), per_prompt)
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
        self.ratios: list[tuple] = []  # per update: (update, mean |ratio − 1|, share clipped), kept on the device
        self._step, self._micro, self._chunks, self._plan = -1, 0, None, None

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def updates_per_step(self) -> int:
        """One step is one epoch: updates_per_epoch PPO updates per pass, inner_epochs passes."""
        return self.updates_per_epoch * self.inner_epochs

    def param_groups(self) -> list[dict]:
        return [{"params": self.params}]

    def draw_prompts(self, generator: torch.Generator) -> torch.Tensor:
        """The prompt index of each of this epoch's trajectories."""
        if self.draw == "each":
            return torch.arange(len(self.prompts)).repeat_interleave(self.samples // len(self.prompts))
        return torch.randint(len(self.prompts), (self.samples,), generator=generator)

    @torch.no_grad()
    def collect(self, epoch: int, generator: torch.Generator) -> dict:
        """Sample this epoch's trajectories with the current policy, score them, compute advantages."""
        ids = self.draw_prompts(generator)
        parts, images = [], []
        for chunk in torch.split(ids, self.sample_batch):
            traj = sample_trajectories(self.unet, self.scheduler, self.cond[chunk.to(self.device)], self.uncond,
                                       self.latent_shape, self.guidance, self.eta, generator)
            x0 = traj["latents"][:, -1]
            decoded = self.vae.decode(x0.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
            images.append((decoded.float() / 2 + 0.5).clamp(0, 1))
            parts.append(traj)
        texts = [self.prompts[i] for i in ids]
        rewards = self.reward(torch.cat(images), texts).float().cpu()
        self.rewards.append([epoch, rewards.mean().item(), rewards.std(unbiased=False).item()])
        log.info("ddpo epoch %d: mean reward %.5g over %d samples", epoch, rewards.mean().item(), len(rewards))
        return dict(latents=torch.cat([t["latents"] for t in parts]), log_probs=torch.cat([t["log_probs"] for t in parts]),
                    timesteps=parts[0]["timesteps"], advantages=self.stats.advantages(rewards, texts).to(self.device),
                    prompt_ids=ids.to(self.device))

    def plan(self, epoch: int, inner: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass's order of the trajectories and, per trajectory, the timesteps it is trained on."""
        g = plan_generator(self.seed, epoch, inner)
        n, steps = self.buffer["log_probs"].shape
        keep = max(1, int(round(steps * self.timestep_fraction)))
        order = torch.randperm(n, generator=g)
        slots = torch.argsort(torch.rand(n, steps, generator=g), dim=1)[:, :keep]
        return order, slots

    def batch(self, step: int, generator: torch.Generator) -> dict:
        """This micro-batch's (trajectory, timestep) pairs; `step` is the update's index (several an epoch)."""
        if step != self._step:  # the loop calls batch() gradient_accumulation_steps times per update
            self._step, self._micro = step, 0
            epoch, within = divmod(step, self.updates_per_step())
            inner, k = divmod(within, self.updates_per_epoch)
            if self.buffer_epoch != epoch:
                self.buffer, self.buffer_epoch = self.collect(epoch, generator), epoch
            if self._plan is None or self._plan[0] != (epoch, inner):
                self._plan = ((epoch, inner), *self.plan(epoch, inner))
            _, order, slots = self._plan
            rows = order[k * self.train_batch:(k + 1) * self.train_batch]
            keep = slots.shape[1]
            pairs = torch.stack([rows.repeat_interleave(keep), slots[rows].reshape(-1)], dim=1)
            self._chunks = torch.tensor_split(pairs, min(self.accum, len(pairs)))
        else:
            self._micro += 1
        return {"pairs": self._chunks[self._micro % len(self._chunks)].to(self.device), "update": step}

    def loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        buf, (i, j) = self.buffer, batch["pairs"].unbind(1)
        x, x_next = buf["latents"][i, j], buf["latents"][i, j + 1]
        t = buf["timesteps"][j]
        out = guided_noise(self.unet, x, t, self.cond[buf["prompt_ids"][i]], self.uncond, self.guidance)
        _, log_prob = ddim_step_with_logprob(self.scheduler, out, t, x, self.eta, prev_sample=x_next)
        old = buf["log_probs"][i, j]
        if self._micro == 0:  # the PPO ratio's distance from 1 at this update (diagnostics, as trl's clipfrac)
            gap = (torch.exp(log_prob.detach().float() - old) - 1).abs()
            self.ratios.append((batch["update"], gap.mean(), (gap > self.clip_range).float().mean()))
        return ppo_loss(log_prob, old, buf["advantages"][i], self.clip_range, self.adv_clip_max)

    def ratio_log(self) -> list[dict]:
        """Per update: how far the PPO ratio is from 1 on its first micro-batch, and the share of pairs
        outside the clip range (0 at an epoch's first update, where the sampling policy is the current one)."""
        return [dict(update=int(u), ratio_gap=float(g), clipped=float(c)) for u, g, c in self.ratios]

    def state_dict(self) -> dict:
        return {"buffer": self.buffer or {}, "buffer_epoch": self.buffer_epoch, "rewards": self.rewards,
                "reward_stats": self.stats.state_dict(), "ppo": self.ratio_log()}

    def load_state_dict(self, state: dict) -> None:
        self.buffer = {k: v.to(self.device) for k, v in state["buffer"].items()} or None
        self.buffer_epoch, self.rewards = int(state["buffer_epoch"]), [list(r) for r in state["rewards"]]
        self.ratios = [(r["update"], r["ratio_gap"], r["clipped"]) for r in state.get("ppo", [])]
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
        (Path(artifact_dir) / "rewards.json").write_text(
            json.dumps({"reward": self.reward_name, "epochs": rows, "updates": self.ratio_log()}, indent=1))

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
