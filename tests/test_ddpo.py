"""DDPO: the DDIM log-probability, guidance, per-prompt advantages, the clipped PPO loss, an epoch's updates, the
reward's input, and a short LoRA run."""

from __future__ import annotations

import math

import pytest
import torch

from conceptbench.methods._policy import RewardStats, ddim_step_with_logprob, ppo_loss
from conceptbench.methods.ddpo import DDPO, prompt_list
from conceptbench.models.tiny import SD15_SCHEDULE
from conceptbench.train import MethodError, TrainContext, train, train_config


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_ddim_step_with_logprob_agrees_with_the_scheduler(kind):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(**{**SD15_SCHEDULE, "prediction_type": kind})
    scheduler.set_timesteps(4)  # 751, 501, 251, 1
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    for t in scheduler.timesteps.tolist():
        prev, log_prob = ddim_step_with_logprob(scheduler, out, t, x, eta=1.0, generator=torch.Generator().manual_seed(5))
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
        expected = scheduler.step(out, t, x, eta=1.0, variance_noise=noise).prev_sample
        torch.testing.assert_close(prev, expected, atol=1e-5, rtol=1e-5)
        # The Gaussian density by hand: mean = the step without noise, std = eta * sqrt(variance).
        mean = scheduler.step(out, t, x, eta=1.0, variance_noise=torch.zeros_like(x)).prev_sample
        std = scheduler._get_variance(t, t - 250).sqrt()
        by_hand = (-((prev - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)).mean(dim=(1, 2, 3))
        torch.testing.assert_close(log_prob, by_hand, atol=1e-4, rtol=1e-5)
    # Per-sample timesteps give each row its own step; a given prev_sample is scored, not redrawn.
    t = torch.tensor([751, 251, 1])
    _, lp_rows = ddim_step_with_logprob(scheduler, out, t, x, prev_sample=prev)
    for i, ti in enumerate(t.tolist()):
        _, lp = ddim_step_with_logprob(scheduler, out[i : i + 1], ti, x[i : i + 1], prev_sample=prev[i : i + 1])
        torch.testing.assert_close(lp_rows[i : i + 1], lp)


def test_ppo_loss_is_clipped_at_the_clip_range():
    adv = torch.tensor([1.0])
    old = torch.zeros(1)

    def loss(ratio, a=adv):
        return ppo_loss(torch.log(torch.tensor([ratio])), old, a, clip_range=0.2).item()

    assert loss(1.0) == pytest.approx(-1.0)
    assert loss(1.1) == pytest.approx(-1.1)  # inside the range: -A·ρ
    assert loss(1.5) == pytest.approx(-1.2)  # A > 0, ρ above 1 + ε: no more gain than ρ = 1.2
    assert loss(0.5) == pytest.approx(-0.5)  # A > 0, ρ below 1 - ε: the unclipped (worse) term counts
    assert loss(0.5, torch.tensor([-1.0])) == pytest.approx(0.8)  # A < 0, ρ below 1 - ε: clipped at 0.8
    assert loss(1.5, torch.tensor([-1.0])) == pytest.approx(1.5)
    assert ppo_loss(old, old, torch.tensor([100.0]), 0.2, adv_clip_max=5.0).item() == pytest.approx(-5.0)
    lp = torch.log(torch.tensor([1.5])).requires_grad_(True)
    ppo_loss(lp, old, adv, 0.2).backward()
    assert lp.grad.item() == 0.0  # clipped: no gradient pushes ρ further


def test_per_batch_advantages_on_hand_cases():
    rewards = torch.tensor([1.0, 3.0, 10.0, 10.0, 20.0, 7.0])
    adv = RewardStats(buffer_size=0, min_count=2, eps=0.0).advantages(rewards, [0, 0, 1, 1, 1, 2])
    assert adv[:2].tolist() == [-1.0, 1.0]  # mean 2, std 1
    s = math.sqrt(200 / 9)  # prompt 1: mean 40/3
    assert adv[2:5].tolist() == pytest.approx([(10 - 40 / 3) / s, (10 - 40 / 3) / s, (20 - 40 / 3) / s])
    glob = rewards.mean().item(), rewards.std(unbiased=False).item()  # one sample: the batch's statistics
    assert adv[5].item() == pytest.approx((7 - glob[0]) / glob[1])


def test_prompt_lists():
    assert prompt_list(["a", "b"]) == ["a", "b"] and "cat" in prompt_list("animals")
    with pytest.raises(MethodError, match="neither a list nor a known set"):
        prompt_list("nope")


def test_ddpo_lora_trains_only_the_adapter_and_round_trips(tiny_pipeline_dir, tmp_path):
    spec = {"experiment": "ddpo", "variant": "lora-true", "method": "ddpo", "seed": 0, "resolution": 64,
            "train": {"steps": 1, "learning_rate": 1e-2, "gradient_accumulation_steps": 2, "checkpoint_every": 0},
            "args": {"reward": "brightness", "prompts": ["a cat", "a dog"], "prompt_draw": "each", "samples_per_epoch": 4,
                     "train_batch_size": 4, "sample_steps": 2, "inner_epochs": 2, "clip_range": 0.2, "use_lora": True,
                     "lora_rank": 4}}
    method = DDPO(spec["args"])
    ctx = TrainContext(spec=spec, base_model=tiny_pipeline_dir, data_dir=None, class_dir=None,
                       device=torch.device("cpu"), mixed_precision="no")
    summary = train(method, ctx, train_config(spec), tmp_path / "work")
    assert len(method.rewards) == 1 and summary["updates"] == 2  # two inner epochs share one epoch's trajectories
    assert method.buffer["latents"].shape == (4, 3, 4, 32, 32) and method.buffer["log_probs"].shape == (4, 2)
    assert summary["trainable_params"] == sum(p.numel() for n, p in method.unet.named_parameters() if "lora" in n)
    method.save(tmp_path / "artifact")
    assert (tmp_path / "artifact" / "rewards.json").exists()
    pipe = DDPO.load_pipeline(tmp_path / "artifact", tiny_pipeline_dir, spec, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x, t, c = torch.randn(1, 4, 32, 32, generator=g), torch.tensor([500]), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, c).sample, method.unet(x, t, c).sample, atol=1e-5, rtol=1e-4)


def test_aesthetic_reward_needs_its_models(tiny_pipeline_dir):
    from conceptbench.methods._rewards import make_reward

    with pytest.raises(MethodError, match="needs the model folders"):
        make_reward("aesthetic", {}, torch.device("cpu"))
    with pytest.raises(MethodError, match="unknown args.reward"):
        make_reward("nope", {}, torch.device("cpu"))


class _LatentImageDDPO(DDPO):
    """DDPO whose 'decoder' shows the latent's first three channels as the image.

    A random tiny VAE ends in a GroupNorm that normalises brightness away, so its images are all about
    equally bright and a brightness reward has nothing to learn from; this decoder keeps the signal
    while the policy (the U-Net), the sampler, the advantages and PPO stay the real ones.
    """

    def setup(self, ctx):
        super().setup(ctx)
        scale = self.vae.config.scaling_factor

        class Direct(torch.nn.Module):
            config, dtype = self.vae.config, torch.float32

            def decode(self, z):
                image = torch.nn.functional.interpolate(z[:, :3] * scale, scale_factor=2).clamp(-1, 1)
                return type("Decoded", (), {"sample": image})

        self.vae = Direct()


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["prefers-bright", "prefers-dark"])
def test_a_brightness_reward_moves_brightness_its_way(tiny_pipeline_dir, tmp_path, monkeypatch, sign):
    import conceptbench.methods.ddpo as ddpo_module

    monkeypatch.setattr(ddpo_module, "make_reward",
                        lambda name, models, device, options=None: lambda images, prompts: sign * images.float().mean(dim=(1, 2, 3)))
    per_prompt, epochs = 8, 4
    # This learning rate moves the reward by 1-3 sample stds per epoch, so earlier epochs' rewards would be a
    # lagging baseline: per-batch statistics (stat_buffer_size 0), as ddpo-pytorch without stat tracking.
    spec = {"experiment": "ddpo", "variant": "lora-false", "method": "ddpo", "seed": 0, "resolution": 64,
            "train": {"steps": epochs, "learning_rate": 1e-3, "adam_weight_decay": 0.0, "checkpoint_every": 0},
            "args": {"reward": "brightness", "prompts": ["a cat"], "prompt_draw": "each", "samples_per_epoch": per_prompt,
                     "sample_batch_size": per_prompt, "train_batch_size": per_prompt, "sample_steps": 4,
                     "guidance_scale": 1.0, "inner_epochs": 1, "clip_range": 0.2, "use_lora": False,
                     "stat_buffer_size": 0, "stat_min_count": 2}}
    method = _LatentImageDDPO(spec["args"])
    ctx = TrainContext(spec=spec, base_model=tiny_pipeline_dir, data_dir=None, class_dir=None,
                       device=torch.device("cpu"), mixed_precision="no")
    train(method, ctx, train_config(spec), tmp_path / "work")
    brightness = [sign * mean for _, mean, _ in method.rewards]  # each epoch's samples, before its update
    spread = max(std for _, _, std in method.rewards)
    # After three PPO updates the samples moved the reward's way by well over the noise of a
    # difference of two 8-sample means (std ~0.008, so 3 standard errors ~0.013; the move is ~0.03-0.07).
    assert sign * (brightness[-1] - brightness[0]) > 3 * spread * math.sqrt(2 / per_prompt), (brightness, spread)


class _Crash(RuntimeError):
    pass


def _crash_after(k):
    def hook(step):
        if step == k:
            raise _Crash(f"simulated crash after step {k}")

    return hook


class _ForgetfulDDPO(_LatentImageDDPO):
    """Resumes without the reward history, as a checkpoint lacking it would."""

    def load_state_dict(self, state):
        super().load_state_dict({k: v for k, v in state.items() if k != "reward_stats"})


def test_ddpo_resume_is_bitwise_identical_with_the_reward_history(tiny_pipeline_dir, tmp_path, monkeypatch):
    import shutil

    import conceptbench.methods.ddpo as ddpo_module

    monkeypatch.setattr(ddpo_module, "make_reward",
                        lambda name, models, device, options=None: lambda images, prompts: images.float().mean(dim=(1, 2, 3)))
    # Two rewards per prompt per epoch and min_count 4: epoch 0 falls back to the batch, epoch 1 uses the
    # prompt's buffer, so the resumed epoch 1 (updates 2 and 3) needs epoch 0's rewards from the checkpoint.
    # The full U-Net, because a LoRA's random initialisation is not drawn from the run's seed.
    spec = {"experiment": "ddpo", "variant": "lora-false", "method": "ddpo", "seed": 0, "resolution": 32,
            "train": {"steps": 2, "learning_rate": 1e-3, "adam_weight_decay": 0.0, "checkpoint_every": 1},
            "args": {"reward": "brightness", "prompts": ["a cat", "a dog"], "prompt_draw": "each", "samples_per_epoch": 4,
                     "train_batch_size": 2, "sample_steps": 2, "guidance_scale": 1.0, "clip_range": 0.2,
                     "timestep_fraction": 0.5, "use_lora": False, "stat_buffer_size": 4, "stat_min_count": 4}}

    def run(name, cls=_LatentImageDDPO, hook=None):
        method = cls(spec["args"])
        ctx = TrainContext(spec=spec, base_model=tiny_pipeline_dir, data_dir=None, class_dir=None,
                           device=torch.device("cpu"), mixed_precision="no")
        return method, train(method, ctx, train_config(spec), tmp_path / name, on_step_end=hook)

    whole, _ = run("whole")
    with pytest.raises(_Crash):
        run("resumed", hook=_crash_after(2))  # after epoch 0's two updates and its checkpoint
    shutil.copytree(tmp_path / "resumed", tmp_path / "forgetful")
    resumed, summary = run("resumed")
    forgetful, _ = run("forgetful", _ForgetfulDDPO)

    assert summary["resumed_from_step"] == 2 and summary["updates"] == 4
    assert resumed.ratio_log() == whole.ratio_log()
    assert all(len(v) == 4 for v in whole.stats.history.values()) and len(whole.stats.history) == 2
    assert resumed.stats.history == whole.stats.history
    assert torch.equal(resumed.buffer["advantages"], whole.buffer["advantages"])
    assert all(torch.equal(a, b) for a, b in zip(whole.params, resumed.params, strict=True))
    # Without the history, epoch 1's advantages come from its batch and the update differs.
    assert not torch.equal(forgetful.buffer["advantages"], whole.buffer["advantages"])
    assert not all(torch.equal(a, b) for a, b in zip(whole.params, forgetful.params, strict=True))


def test_an_epoch_makes_several_updates_and_the_ratio_leaves_one_after_the_first(tiny_pipeline_dir, tmp_path):
    """As trl's DDPOTrainer: an epoch's trajectories feed samples_per_epoch / train_batch_size updates; the
    first is taken by the policy that sampled (ratio 1), the later ones by a changed one, so clipping acts."""
    spec = {"experiment": "ddpo", "variant": "lora-false", "method": "ddpo", "seed": 0, "resolution": 32,
            "train": {"steps": 2, "learning_rate": 1e-3, "checkpoint_every": 0, "gradient_accumulation_steps": 2},
            "args": {"reward": "brightness", "prompts": ["a cat", "a dog", "a cow"], "samples_per_epoch": 6,
                     "sample_batch_size": 4, "train_batch_size": 2, "sample_steps": 3, "use_lora": False}}
    method = DDPO(spec["args"])
    ctx = TrainContext(spec=spec, base_model=tiny_pipeline_dir, data_dir=None, class_dir=None,
                       device=torch.device("cpu"), mixed_precision="no")
    summary = train(method, ctx, train_config(spec), tmp_path / "work")
    assert method.updates_per_step() == 3 and summary["steps"] == 2 and summary["updates"] == 6
    assert [e for e, _, _ in method.rewards] == [0, 1]  # one round of sampling per epoch (step)
    assert method.buffer["log_probs"].shape == (6, 3)  # 6 trajectories of 3 steps, sampled 4 + 2
    log = method.ratio_log()
    assert [r["update"] for r in log] == list(range(6))
    for r in log:
        if r["update"] % 3 == 0:  # an epoch's first update: the policy that sampled
            assert r["ratio_gap"] < 1e-5 and r["clipped"] == 0.0, r
        else:
            assert r["ratio_gap"] > spec_clip(method) and r["clipped"] > 0.0, r


def spec_clip(method) -> float:
    return method.clip_range


def test_the_epoch_shape_is_checked():
    from conceptbench.methods.ddpo import epoch_shape

    assert epoch_shape(24, 3, 27, "random") == 8  # trl's example: 8 updates an epoch
    with pytest.raises(MethodError, match="samples_per_epoch 24 is not a multiple of args.train_batch_size 5"):
        epoch_shape(24, 5, 27, "random")
    with pytest.raises(MethodError, match="prompt_draw 'each' needs args.samples_per_epoch"):
        epoch_shape(24, 3, 5, "each")


def test_guided_noise_is_uncond_plus_scale_times_cond_minus_uncond():
    """Classifier-free guidance as the pipelines apply it, ε_u + s·(ε_c − ε_u), for the trajectories and the
    PPO forward alike: swapping the halves or starting from ε_c changes the guidance the policy trains under."""
    from conceptbench.methods._policy import guided_noise

    class Echo(torch.nn.Module):  # "predicts" the first value of its text condition everywhere
        def forward(self, x, t, cond):
            return type("Out", (), {"sample": cond[:, :1, :1, None].expand_as(x)})

    x, cond, uncond = torch.zeros(2, 4, 8, 8), torch.full((2, 77, 32), 3.0), torch.full((1, 77, 32), 1.0)
    out = guided_noise(Echo(), x, torch.tensor(500), cond, uncond, guidance_scale=5.0)
    assert torch.equal(out, torch.full_like(x, 1.0 + 5.0 * (3.0 - 1.0)))


def test_the_log_probability_uses_eta():
    """DDIM's η sets the step's std (η·σ_t): the sampled step and its density follow DDIMScheduler at η = 0.5 too."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(**SD15_SCHEDULE)
    scheduler.set_timesteps(4)
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    prev, log_prob = ddim_step_with_logprob(scheduler, out, 501, x, eta=0.5, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(prev, scheduler.step(out, 501, x, eta=0.5, variance_noise=noise).prev_sample,
                               atol=1e-5, rtol=1e-5)
    mean = scheduler.step(out, 501, x, eta=0.5, variance_noise=torch.zeros_like(x)).prev_sample
    std = 0.5 * scheduler._get_variance(501, 251).sqrt()
    by_hand = (-((prev - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob, by_hand, atol=1e-4, rtol=1e-5)


def set_up(base, cls=DDPO, **args):
    """A DDPO set up on the tiny pipeline (32², brightness reward, the full U-Net unless args say otherwise)."""
    spec = {"seed": 0, "resolution": 32, "train": {"steps": 1, "learning_rate": 1e-3, "checkpoint_every": 0},
            "args": {"reward": "brightness", "prompts": ["a cat", "a dog"], "samples_per_epoch": 6,
                     "train_batch_size": 2, "sample_steps": 4, "use_lora": False, **args}}
    method = cls(spec["args"])
    method.setup(TrainContext(spec=spec, base_model=base, data_dir=None, class_dir=None, device=torch.device("cpu"),
                              mixed_precision="no"))
    return method


def test_an_epochs_updates_take_each_trajectory_once_on_its_share_of_timesteps(tiny_pipeline_dir):
    """samples_per_epoch / train_batch_size updates partition the epoch's trajectories, and each is trained
    on round(timestep_fraction · sample_steps) distinct timesteps: no trajectory is trained twice or left
    out, and timestep_fraction is the share trained on."""
    method = set_up(tiny_pipeline_dir, timestep_fraction=0.5)
    assert method.updates_per_step() == 3
    with torch.no_grad():
        pairs = [method.batch(u, torch.Generator().manual_seed(u))["pairs"] for u in range(3)]
    rows = [sorted(set(p[:, 0].tolist())) for p in pairs]
    assert all(len(r) == 2 for r in rows) and sorted(sum(rows, [])) == list(range(6)), rows
    every = torch.cat(pairs)
    for i in range(6):
        steps = every[every[:, 0] == i, 1].tolist()
        assert len(steps) == len(set(steps)) == 2 and all(0 <= s < 4 for s in steps), (i, steps)


def test_each_pair_is_weighed_by_the_advantage_of_its_own_trajectory(tiny_pipeline_dir):
    """At an epoch's first update the PPO ratio is 1, so the loss is −mean(A) over the update's (trajectory,
    timestep) pairs, A being the pair's trajectory's advantage: a reward credited to another trajectory (or
    looked up by timestep) trains the policy towards samples that did not earn it."""
    method = set_up(tiny_pipeline_dir, timestep_fraction=0.5)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        batch = method.batch(0, g)  # samples the epoch
        method.buffer["advantages"] = torch.tensor([0.1, 0.2, 0.4, 0.8, 1.6, 3.2])  # every subset sums apart
        loss = method.loss(batch, g)
    i = batch["pairs"][:, 0]
    assert len(set(i.tolist())) == 2
    torch.testing.assert_close(loss, -method.buffer["advantages"][i].mean(), atol=1e-4, rtol=1e-4)


def test_the_ppo_forward_scores_each_step_with_the_eta_that_sampled_it(tiny_pipeline_dir):
    """With args.eta ≠ 1 the update's log-probabilities use the same η as the trajectories: at an epoch's
    first update the ratio is then 1, not off by the density ratio of two different step variances."""
    method = set_up(tiny_pipeline_dir, eta=0.5)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        method.loss(method.batch(0, g), g)
    assert method.ratio_log()[0]["ratio_gap"] < 1e-5, method.ratio_log()


def test_random_prompt_draws_reach_every_prompt_about_equally(tiny_pipeline_dir):
    """prompt_draw random draws each trajectory's prompt uniformly over all of args.prompts (trl's prompt_fn)."""
    method = set_up(tiny_pipeline_dir, prompts=["a cat", "a dog", "a cow"], samples_per_epoch=300)
    counts = torch.bincount(method.draw_prompts(torch.Generator().manual_seed(0)), minlength=3)
    assert len(counts) == 3 and counts.min() > 70, counts


def test_the_ddpo_lora_has_the_rank_asked_for(tiny_pipeline_dir):
    """args.lora_rank sets the adapter's rank (trl's example: 4), not a rank fixed in the code."""
    method = set_up(tiny_pipeline_dir, use_lora=True, lora_rank=2)
    ranks = {p.shape[0] for n, p in method.unet.named_parameters() if "lora_A" in n}
    assert ranks == {2}


def test_the_reward_sees_the_decoded_final_latents_in_zero_to_one(tiny_pipeline_dir, monkeypatch):
    """The reward scores what the pipeline would show: the VAE decoding of x_0 / scaling_factor, mapped from
    [−1, 1] to [0, 1] as diffusers' image processor does."""
    import conceptbench.methods.ddpo as ddpo_module
    from diffusers.image_processor import VaeImageProcessor

    seen = []
    monkeypatch.setattr(ddpo_module, "make_reward", lambda name, models, device, options=None:
                        lambda images, prompts: seen.append(images) or images.mean(dim=(1, 2, 3)))
    method = set_up(tiny_pipeline_dir, samples_per_epoch=2, sample_steps=2)
    with torch.no_grad():
        buffer = method.collect(0, torch.Generator().manual_seed(0))
        decoded = method.vae.decode(buffer["latents"][:, -1] / method.vae.config.scaling_factor).sample
    expected = VaeImageProcessor().postprocess(decoded, output_type="pt")
    torch.testing.assert_close(seen[0], expected, atol=1e-5, rtol=1e-5)
