"""LCM distillation: the small pieces on hand cases and against diffusers, the student, the distillation target,
the EMA, the loss types, the artifact and 4-step sampling."""

from __future__ import annotations

import pytest
import torch

from conceptbench.methods.lcm import (
    LCM,
    boundary_scalings,
    ddim_grid,
    ddim_solver_step,
    guidance_scale_embedding,
    predicted_x0_eps,
    pseudo_huber_loss,
)
from conceptbench.models.tiny import SD15_SCHEDULE
from conceptbench.train import TrainContext, train, train_config


def test_pseudo_huber_loss_on_hand_cases():
    zero = torch.zeros(2)
    assert pseudo_huber_loss(zero, zero, 0.001).item() == 0.0
    # sqrt(3² + 4²) - 4 = 1 and sqrt(0 + 16) - 4 = 0: mean 0.5
    assert pseudo_huber_loss(torch.tensor([3.0, 0.0]), zero, 4.0).item() == pytest.approx(0.5)
    # small c: ≈ |error| (linear); large c: ≈ error² / (2c) (quadratic)
    assert pseudo_huber_loss(torch.tensor([2.0]), torch.tensor([0.0]), 1e-6).item() == pytest.approx(2.0, rel=1e-5)
    assert pseudo_huber_loss(torch.tensor([1.0]), torch.tensor([0.0]), 10.0).item() == pytest.approx(101**0.5 - 10, rel=1e-5)


def test_guidance_embedding_matches_the_pipelines():
    from diffusers import StableDiffusionPipeline

    w = torch.tensor([4.0, 7.5, 14.0])
    for dim in (256, 33):
        expected = StableDiffusionPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        torch.testing.assert_close(guidance_scale_embedding(w, dim), expected)


def test_boundary_scalings_match_lcm_scheduler_and_the_boundary():
    from diffusers import LCMScheduler

    scheduler = LCMScheduler(**{k: v for k, v in SD15_SCHEDULE.items() if k != "clip_sample"})
    t = torch.tensor([0, 1, 19, 499, 999])
    c_skip, c_out = boundary_scalings(t)
    for i, step in enumerate(t.tolist()):
        skip, out = scheduler.get_scalings_for_boundary_condition_discrete(step)
        assert c_skip[i].item() == pytest.approx(float(skip)) and c_out[i].item() == pytest.approx(float(out))
    assert (c_skip[0].item(), c_out[0].item()) == (1.0, 0.0)  # f(x, 0) = x
    assert c_skip[1].item() == pytest.approx(0.25 / 100.25)


def test_ddim_solver_step_equals_the_scheduler_step():
    from diffusers import DDIMScheduler

    assert ddim_grid(1000, 50).tolist() == list(range(19, 1000, 20))
    scheduler = DDIMScheduler(**SD15_SCHEDULE)
    scheduler.set_timesteps(50)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = 501  # on the scheduler's grid; its previous timestep is 481
    x0, eps_hat = predicted_x0_eps(eps, torch.tensor([t, t]), x, scheduler.alphas_cumprod, "epsilon")
    ours = ddim_solver_step(x0, eps_hat, scheduler.alphas_cumprod[torch.tensor([481, 481])])
    torch.testing.assert_close(ours, scheduler.step(eps, t, x, eta=0.0).prev_sample, atol=1e-5, rtol=1e-5)


def make(spec, base, data):
    ctx = TrainContext(spec=spec, base_model=base, data_dir=data, class_dir=None, device=torch.device("cpu"),
                       mixed_precision="no")
    return LCM(spec["args"]), ctx


SPEC = {"experiment": "lcm", "variant": "loss-huber", "method": "lcm", "seed": 0, "resolution": 64,
        "train": {"steps": 2, "learning_rate": 1e-3, "batch_size": 2},
        "args": {"loss_type": "huber", "huber_c": 0.001, "num_ddim_timesteps": 50, "w_min": 5.0, "w_max": 15.0,
                 "ema_decay": 0.9, "time_cond_proj_dim": 16}}


def test_student_starts_as_teacher_and_ema_follows(tiny_pipeline_dir, caption_dir, tmp_path):  # noqa: F811
    method, ctx = make(SPEC, tiny_pipeline_dir, caption_dir)
    method.setup(ctx)
    g = torch.Generator().manual_seed(1)
    x, t, cond = torch.randn(2, 4, 32, 32, generator=g), torch.tensor([99, 599]), torch.randn(2, 77, 32, generator=g)
    w = guidance_scale_embedding(torch.tensor([5.0, 12.0]), 16)
    with torch.no_grad():
        torch.testing.assert_close(method.student(x, t, cond, timestep_cond=w).sample, method.teacher(x, t, cond).sample)
    before = {k: v.clone() for k, v in method.target.state_dict().items()}
    train(method, ctx, train_config(SPEC), tmp_path / "work")  # setup again, then 2 steps
    student, target = method.student.state_dict(), method.target.state_dict()
    key = "time_embedding.cond_proj.weight"
    assert student[key].abs().sum() > 0  # the guidance embedding learns
    assert not torch.equal(target[key], before[key]) and not torch.allclose(target[key], student[key])


def test_lcm_sampling_makes_exactly_four_unet_calls(tiny_pipeline_dir, caption_dir, tmp_path):  # noqa: F811
    from diffusers import LCMScheduler

    spec = {**SPEC, "train": {**SPEC["train"], "steps": 1}}
    method, ctx = make(spec, tiny_pipeline_dir, caption_dir)
    train(method, ctx, train_config(spec), tmp_path / "work")
    method.save(tmp_path / "artifact")
    pipe = LCM.load_pipeline(tmp_path / "artifact", tiny_pipeline_dir, spec, torch.device("cpu"))
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.unet.config.time_cond_proj_dim == 16
    calls = []
    pipe.unet.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    image = pipe("a cat", num_inference_steps=4, guidance_scale=8.0, height=64, width=64,
                 generator=torch.Generator().manual_seed(0), output_type="np").images
    assert calls == [1, 1, 1, 1]  # 4 steps, no classifier-free guidance batch: w goes in through the embedding
    assert image.shape == (1, 64, 64, 3)


def test_the_studys_lcm_trains_batches_of_12_without_weight_decay(tiny_pipeline_dir, caption_dir, tmp_path,
                                                                    monkeypatch):
    """config/config.yaml's LCM as the README command runs it: 12 images a batch, AdamW without weight decay."""
    from pathlib import Path

    from conceptbench import config as cb
    from conceptbench.train import core

    study = cb.resolve_variant(cb.load(Path(__file__).resolve().parents[1] / "config/config.yaml"), "lcm", "loss-l2")
    spec = {**SPEC, "train": {**study["train"], "steps": 1, "checkpoint_every": 0}}
    made, real = [], core.make_optimizer
    monkeypatch.setattr(core, "make_optimizer", lambda cfg, groups: made.append(real(cfg, groups)) or made[-1])
    method, ctx = make(spec, tiny_pipeline_dir, caption_dir)
    train(method, ctx, train_config(spec), tmp_path / "work")
    assert method.batch(0, torch.Generator().manual_seed(0))["x_t"].shape[0] == 12
    assert [g["weight_decay"] for g in made[0].param_groups] == [0.0]
    assert made[0].param_groups[0]["lr"] == 1e-6


def test_cached_encodings_give_the_batches_of_encoding_each_one(tiny_pipeline_dir, caption_dir):  # noqa: F811
    """cache_latents encodes each image and caption once, at setup; each step then draws the same images,
    captions and noise as encoding the batch does, so the teacher's target is the same up to float rounding."""
    batches = {}
    for cache in (False, True):
        spec = {**SPEC, "args": {**SPEC["args"], "cache_latents": cache}}
        method, ctx = make(spec, tiny_pipeline_dir, caption_dir)
        method.setup(ctx)
        assert (method.encoded is not None) == cache
        with torch.no_grad():
            batches[cache] = method.batch(0, torch.Generator().manual_seed(3))
    for key in ("x_t", "t", "w_emb", "cond", "target"):
        torch.testing.assert_close(batches[True][key], batches[False][key], atol=1e-5, rtol=1e-4)
    assert len(set(batches[True]["cond"][:, 5].sum(-1).tolist())) > 1  # different captions in the batch


def recovered_guidance(w_emb: torch.Tensor) -> torch.Tensor:
    """w from its embedding: the slowest of its frequencies turns 1000·w·10⁻⁴ = w/10 radians (below π for w < 31)."""
    half = w_emb.shape[1] // 2
    return torch.atan2(w_emb[:, half - 1], w_emb[:, 2 * half - 1]) * 10.0


def three_unets(spec, base, data):
    """An LCM set up with its teacher, student and EMA target made three different networks (as after
    training), so that a step using the wrong one shows."""
    method, ctx = make(spec, base, data)
    method.setup(ctx)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for unet, size in ((method.student, 0.05), (method.target, 0.1)):
            for p in unet.parameters():
                p.add_(size * torch.randn(p.shape, generator=g))
    return method


def test_the_target_is_the_ema_unet_one_guided_teacher_ddim_step_earlier(tiny_pipeline_dir, caption_dir):
    """The distillation target: the teacher, guided at scale w + 1 (diffusers' pipelines give the student's
    embedding guidance_scale − 1), takes one step of the 50-step DDIM grid from t_n to t_n − 20, and the
    EMA target's consistency output there is the target. A target from the student, a teacher that is the
    student, a step of another size, a guidance off by one or guiding x̂₀ and ε̂ differently all bias what
    the few-step model learns while the loss still falls."""
    from diffusers import DDIMScheduler

    method = three_unets(SPEC, tiny_pipeline_dir, caption_dir)
    with torch.no_grad():
        batch = method.batch(0, torch.Generator().manual_seed(3))
        x_t, t, cond = batch["x_t"], batch["t"], batch["cond"]
        w = recovered_guidance(batch["w_emb"])
        torch.testing.assert_close(batch["w_emb"], guidance_scale_embedding(w, 16), atol=1e-2, rtol=0)
        assert set(t.tolist()) <= set(ddim_grid(1000, 50).tolist()) and (t > 20).all(), t
        uncond = method.uncond.expand_as(cond)
        e_c, e_u = method.teacher(x_t, t, cond).sample, method.teacher(x_t, t, uncond).sample
        guided = e_u + (w + 1).view(-1, 1, 1, 1) * (e_c - e_u)  # as StableDiffusionPipeline guides at w + 1
        ddim = DDIMScheduler(**SD15_SCHEDULE)
        ddim.set_timesteps(50)
        x_prev = torch.cat([ddim.step(guided[i : i + 1], int(t[i]), x_t[i : i + 1], eta=0.0).prev_sample
                            for i in range(len(t))])
        t_prev = t - 20
        out = method.target(x_prev, t_prev, cond, timestep_cond=batch["w_emb"]).sample
        x0, _ = predicted_x0_eps(out, t_prev, x_prev, method.alphas_cumprod, "epsilon")
        c_skip, c_out = boundary_scalings(t_prev)
        expected = c_skip.view(-1, 1, 1, 1) * x_prev + c_out.view(-1, 1, 1, 1) * x0
    torch.testing.assert_close(batch["target"], expected, atol=1e-4, rtol=1e-4)


def test_guidance_scales_are_drawn_across_w_min_to_w_max(tiny_pipeline_dir, caption_dir):
    """w is uniform on [w_min, w_max] (5 to 15 in the study): the student learns the guidance range asked for."""
    spec = {**SPEC, "train": {**SPEC["train"], "batch_size": 16}}
    method, ctx = make(spec, tiny_pipeline_dir, caption_dir)
    method.setup(ctx)
    with torch.no_grad():
        w = recovered_guidance(method.batch(0, torch.Generator().manual_seed(0))["w_emb"])
    assert ((w >= 5.0 - 1e-3) & (w <= 15.0 + 1e-3)).all(), w
    assert w.min() < 8.0 and w.max() > 12.0, w  # the whole range, not a corner of it


def test_the_ema_target_moves_one_minus_decay_of_the_way_to_the_student(tiny_pipeline_dir, caption_dir):
    """After each step target ← decay · target + (1 − decay) · student: a target that jumped (1 − decay is
    0.05 in the study) nearly onto the student would make the consistency target chase the student."""
    method = three_unets(SPEC, tiny_pipeline_dir, caption_dir)  # ema_decay 0.9
    before = {k: v.clone() for k, v in method.target.state_dict().items()}
    student = method.student.state_dict()
    method.after_step(0)
    after = method.target.state_dict()
    for k in ("conv_in.weight", "time_embedding.cond_proj.weight"):
        torch.testing.assert_close(after[k], 0.9 * before[k] + 0.1 * student[k])


def test_the_artifact_is_the_ema_target_with_the_grid_and_scaling_trained_on(tiny_pipeline_dir, caption_dir, tmp_path):
    """The saved U-Net is the EMA target, not the student, and the LCMScheduler samples with the DDIM grid
    and the boundary scaling the model was distilled with."""
    from diffusers import LCMScheduler, UNet2DConditionModel

    spec = {**SPEC, "args": {**SPEC["args"], "num_ddim_timesteps": 25, "timestep_scaling": 5.0}}
    method = three_unets(spec, tiny_pipeline_dir, caption_dir)
    method.save(tmp_path / "artifact")
    saved = UNet2DConditionModel.from_pretrained(str(tmp_path / "artifact" / "unet")).state_dict()
    target = method.target.state_dict()
    assert saved.keys() == target.keys() and all(torch.equal(saved[k], target[k]) for k in saved)
    scheduler = LCMScheduler.from_pretrained(str(tmp_path / "artifact" / "scheduler"))
    assert (scheduler.config.original_inference_steps, scheduler.config.timestep_scaling) == (25, 5.0)


@pytest.mark.parametrize("loss_type", ["l2", "huber"])
def test_the_loss_is_the_one_loss_type_names(tiny_pipeline_dir, caption_dir, loss_type):
    """The study's sweep is args.loss_type: l2 must be the mean squared error and huber the pseudo-Huber
    loss with args.huber_c, or the two variants train the same objective (or another one)."""
    import torch.nn.functional as F

    spec = {**SPEC, "args": {**SPEC["args"], "loss_type": loss_type, "huber_c": 0.05}}
    method = three_unets(spec, tiny_pipeline_dir, caption_dir)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        batch = method.batch(0, g)
        pred = method._consistency(method.student, batch["x_t"], batch["t"], batch["w_emb"], batch["cond"])
        loss = method.loss(batch, g)
    l2, huber = F.mse_loss(pred, batch["target"]), pseudo_huber_loss(pred, batch["target"], 0.05)
    assert not torch.allclose(l2, huber, rtol=1e-2)
    torch.testing.assert_close(loss, l2 if loss_type == "l2" else huber)
