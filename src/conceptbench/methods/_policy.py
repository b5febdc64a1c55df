"""The denoising loop as a policy (DDPO, Black et al. 2023): DDIM steps with log-probabilities,
trajectories with classifier-free guidance, per-prompt advantages (over a reward history) and the clipped
PPO objective.

Ideas follow kvablack/ddpo-pytorch (ddim_with_logprob.py, stat_tracking.py, train.py), written anew
for diffusers' DDIMScheduler, whose step() returns no log-probability.
"""

from __future__ import annotations

import math
from collections import deque

import torch


def _per_sample(x: torch.Tensor, ndim: int) -> torch.Tensor:
    return x.reshape(-1, *[1] * (ndim - 1))


def ddim_step_with_logprob(scheduler, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 1.0,
                           generator: torch.Generator | None = None, prev_sample: torch.Tensor | None = None):
    """One DDIM step x_t -> x_{t-1} ~ N(μ, σ²) and the log-density of x_{t-1}, averaged over its elements.

    Same μ and σ as DDIMScheduler.step (eta > 0); `timestep` may be one int or one per sample. The noise
    comes from the CPU `generator` (the first randn of sample's shape), unless `prev_sample` is given,
    whose log-probability is then evaluated (PPO's ratio under the current policy).
    Returns (prev_sample, log_prob [N]).
    """
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps() before ddim_step_with_logprob")
    if eta <= 0:
        raise ValueError(f"eta must be > 0 for a log-probability (got {eta}); DDPO uses eta = 1")
    if scheduler.config.thresholding:
        raise ValueError("ddim_step_with_logprob: dynamic thresholding is not supported")
    x, out, ndim = sample.float(), model_output.float(), sample.ndim
    t = torch.as_tensor(timestep, device=x.device).long().reshape(-1).expand(x.shape[0])
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    ac = scheduler.alphas_cumprod.to(x.device)
    a_t = _per_sample(ac[t], ndim)
    a_prev = _per_sample(torch.where(prev_t >= 0, ac[prev_t.clamp(min=0)], scheduler.final_alpha_cumprod.to(x.device)), ndim)

    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        x0, eps = (x - (1 - a_t).sqrt() * out) / a_t.sqrt(), out
    elif kind == "v_prediction":
        x0, eps = a_t.sqrt() * x - (1 - a_t).sqrt() * out, a_t.sqrt() * out + (1 - a_t).sqrt() * x
    elif kind == "sample":
        x0, eps = out, (x - a_t.sqrt() * out) / (1 - a_t).sqrt()
    else:
        raise ValueError(f"unsupported prediction_type {kind!r}")
    if scheduler.config.clip_sample:
        r = scheduler.config.clip_sample_range
        x0 = x0.clamp(-r, r)

    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * variance.sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * eps
    if prev_sample is None:
        noise = torch.randn(x.shape, generator=generator).to(x.device)
        prev_sample = mean + std * noise
    prev = prev_sample.detach().float()
    log_prob = -((prev - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)
    return prev_sample, log_prob.mean(dim=tuple(range(1, ndim)))


def guided_noise(unet, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                 guidance_scale: float) -> torch.Tensor:
    """Classifier-free guided model output: uncond + s·(cond − uncond), both in one U-Net call."""
    t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
    out = unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, uncond.expand_as(cond)])).sample
    c, u = out.chunk(2)
    return u + guidance_scale * (c - u)


def sample_trajectories(unet, scheduler, cond: torch.Tensor, uncond: torch.Tensor, latent_shape: tuple,
                        guidance_scale: float, eta: float, generator: torch.Generator) -> dict:
    """Run the DDIM chain from noise for each row of `cond`, keeping every latent and step log-prob.

    The scheduler must have its timesteps set. Returns latents [N, T+1, ...] (x_T ... x_0),
    log_probs [N, T] and timesteps [T].
    """
    n = cond.shape[0]
    x = (torch.randn((n, *latent_shape), generator=generator) * scheduler.init_noise_sigma).to(cond.device)
    latents, log_probs = [x], []
    for t in scheduler.timesteps:
        out = guided_noise(unet, scheduler.scale_model_input(x, t), t.to(cond.device), cond, uncond, guidance_scale)
        x, lp = ddim_step_with_logprob(scheduler, out, t, x, eta, generator=generator)
        x = x.to(cond.dtype)
        latents.append(x)
        log_probs.append(lp)
    return dict(latents=torch.stack(latents, dim=1), log_probs=torch.stack(log_probs, dim=1),
                timesteps=scheduler.timesteps.clone())


class RewardStats:
    """Per-prompt reward history for DDPO's advantages (idea from ddpo-pytorch's PerPromptStatTracker).

    Keeps, per prompt text, a deque of its last `buffer_size` rewards across epochs. `advantages` adds
    this batch's rewards to each prompt's deque, then normalises them, (r − mean) / (std + eps), by the
    deque's mean and std once it holds at least `min_count` rewards, else by the whole batch's. With
    `buffer_size` 0 nothing is kept and the statistics are this batch's samples of the prompt only
    (with min_count 2: the per-batch normalisation DDPO used before the history). std is the population
    std (ddof 0), computed in float32. `state_dict` holds the history as plain floats (checkpointable).
    """

    def __init__(self, buffer_size: int = 16, min_count: int = 16, eps: float = 1e-6):
        self.buffer_size, self.min_count, self.eps = int(buffer_size), int(min_count), eps
        self.history: dict[str, deque] = {}

    def advantages(self, rewards: torch.Tensor, prompts: list) -> torch.Tensor:
        """Advantages for `rewards` [N] of samples from `prompts` (N keys: texts, or ids), updating the history."""
        rewards = rewards.detach().float().cpu()
        if len(prompts) != rewards.numel():
            raise ValueError(f"RewardStats: {rewards.numel()} rewards but {len(prompts)} prompts")
        adv = torch.empty_like(rewards)
        glob = (rewards.mean(), rewards.std(unbiased=False) if rewards.numel() > 1 else torch.tensor(0.0))
        for prompt in dict.fromkeys(prompts):  # in order of first appearance
            mask = torch.tensor([p == prompt for p in prompts])
            r = rewards[mask]
            pool = r
            if self.buffer_size:
                kept = self.history.setdefault(prompt, deque(maxlen=self.buffer_size))
                kept.extend(r.tolist())
                pool = torch.tensor(list(kept), dtype=torch.float32)
            mean, std = (pool.mean(), pool.std(unbiased=False)) if pool.numel() >= self.min_count else glob
            adv[mask] = (r - mean) / (std + self.eps)
        return adv

    def state_dict(self) -> dict:
        return {"history": {prompt: list(kept) for prompt, kept in self.history.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.history = {prompt: deque(values, maxlen=self.buffer_size)
                        for prompt, values in state["history"].items()} if self.buffer_size else {}


def ppo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float,
             adv_clip_max: float = 5.0) -> torch.Tensor:
    """PPO's clipped surrogate, to minimise: mean(max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε))), ρ = exp(log π − log π_old)."""
    adv = advantages.clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped).mean()
