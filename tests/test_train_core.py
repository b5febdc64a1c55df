"""The shared loop: resume, non-finite guard, schedules, precision and config checks."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from conceptbench.io import read_jsonl
from conceptbench.config import ConfigError
from conceptbench.registry import build
from conceptbench.train import Method, NonFiniteLoss, TrainContext, run_training, step_generator, train, train_config
from conceptbench.train.checkpoint import CHECKPOINT


class Crash(RuntimeError):
    pass


class Toy(Method):
    """Linear regression: fast enough to test the loop alone. args.nan_from: a step giving NaN loss."""

    name = "toy"

    def setup(self, ctx):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(4, 1)
        self.frozen = torch.nn.Linear(4, 4).requires_grad_(False)
        self.true_w = torch.arange(4.0)

    def param_groups(self):
        return [{"params": list(self.model.parameters())}]

    def batch(self, step, generator):
        x = torch.randn(8, 4, generator=generator)
        return step, self.frozen(x), self.frozen(x) @ self.true_w

    def loss(self, batch, generator):
        step, x, y = batch
        loss = ((self.model(x).squeeze(-1) - y) ** 2).mean()
        nan_from = self.args.get("nan_from")
        return loss * float("nan") if nan_from is not None and step + 1 >= nan_from else loss


def toy_run(tmp_path, on_step_end=None, args=None, **train_overrides):
    spec = {"seed": 0, "train": {"steps": 6, "learning_rate": 0.05, "checkpoint_every": 2, "log_every": 1,
                                 **train_overrides}}
    method = Toy(args or {})
    ctx = TrainContext(spec=spec, base_model=tmp_path, data_dir=tmp_path, class_dir=None,
                       device=torch.device("cpu"), mixed_precision=spec["train"].get("mixed_precision", "no"))
    summary = train(method, ctx, train_config(spec), tmp_path / "work", on_step_end=on_step_end)
    return method, summary, read_jsonl(tmp_path / "work" / "loss_log.jsonl")


def crash_after(k):
    def hook(step):
        if step == k:
            raise Crash(f"simulated crash after step {k}")

    return hook


def test_step_generator_is_a_function_of_seed_and_step():
    draw = lambda *key: torch.randn(3, generator=step_generator(*key))  # noqa: E731
    assert torch.equal(draw(0, 5), draw(0, 5))
    assert not torch.equal(draw(0, 5), draw(0, 6))
    assert not torch.equal(draw(0, 5), draw(1, 5))
    assert not torch.equal(draw(0, 5, 0), draw(0, 5, 1))


def test_dreambooth_resume_is_bitwise_identical(tiny_pipeline_dir, instance_dir, class_dir, dreambooth_spec, tmp_path):
    def run(name, hook=None):
        out = tmp_path / name
        return out, run_training(build(dreambooth_spec), dreambooth_spec, tiny_pipeline_dir, instance_dir, class_dir,
                                 out / "artifact", out / "work", out / "loss.jsonl", out / "summary.json", device="cpu",
                                 on_step_end=hook)

    whole, _ = run("whole")
    with pytest.raises(Crash):
        run("resumed", crash_after(3))  # checkpoint written at step 2; step 3 is lost
    resumed = tmp_path / "resumed"
    assert not (resumed / "artifact").exists()
    assert torch.load(resumed / "work" / CHECKPOINT, weights_only=True)["step"] == 2
    _, summary = run("resumed")

    assert summary["resumed_from_step"] == 2 and summary["steps"] == 4
    assert not (resumed / "work" / CHECKPOINT).exists()  # removed once the artifact is saved
    unet = "artifact/unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(whole / unet), load_file(resumed / unet)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda d: [(r["step"], r["loss"]) for r in read_jsonl(d / "loss.jsonl")]  # noqa: E731
    assert losses(whole) == losses(resumed) and len(losses(whole)) == 4
    written = json.loads((resumed / "summary.json").read_text())
    assert written["artifact_bytes"] > 0 and written["peak_mem_source"] == "ru_maxrss"
    assert written["trainable_params"] == sum(t.numel() for t in a.values())


def test_toy_resume_with_accumulation_and_warmup(tmp_path):
    settings = dict(gradient_accumulation_steps=2, lr_scheduler="cosine", lr_warmup_steps=2)
    whole, _, rows = toy_run(tmp_path / "a", **settings)
    with pytest.raises(Crash):
        toy_run(tmp_path / "b", crash_after(5), **settings)
    resumed, summary, resumed_rows = toy_run(tmp_path / "b", **settings)
    assert summary["resumed_from_step"] == 4
    assert torch.equal(whole.model.weight, resumed.model.weight)
    assert [r["loss"] for r in rows] == [r["loss"] for r in resumed_rows]


def test_stale_checkpoint_is_ignored(tmp_path):
    with pytest.raises(Crash):
        toy_run(tmp_path, crash_after(3))
    _, summary, _ = toy_run(tmp_path, learning_rate=0.01)  # another spec: no resume
    assert summary["resumed_from_step"] == 0


def test_only_trainable_parameters_change(tmp_path):
    method, summary, _ = toy_run(tmp_path, checkpoint_every=0)
    untrained = Toy({})
    untrained.setup(None)
    assert torch.equal(method.frozen.weight, untrained.frozen.weight)
    assert not torch.equal(method.model.weight, untrained.model.weight)
    assert summary["trainable_params"] == 5


def test_loss_log_and_linear_warmup_schedule(tmp_path):
    _, summary, rows = toy_run(tmp_path, steps=4, lr_scheduler="linear", lr_warmup_steps=2)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["lr"] for r in rows] == pytest.approx([0.0, 0.025, 0.05, 0.025])
    assert summary["final_loss"] == rows[-1]["last_loss"]


def test_log_every_averages_the_window(tmp_path):
    _, _, every = toy_run(tmp_path / "a", log_every=1, checkpoint_every=0)
    _, _, windows = toy_run(tmp_path / "b", log_every=3, checkpoint_every=0)
    assert [r["step"] for r in windows] == [3, 6]
    assert windows[0]["loss"] == pytest.approx(sum(r["loss"] for r in every[:3]) / 3)


def test_non_finite_loss_stops_naming_the_step(tmp_path):
    with pytest.raises(NonFiniteLoss, match=r"at step 3 of 6; last finite loss [0-9.e+-]+ at step 2"):
        toy_run(tmp_path, args={"nan_from": 3}, log_every=5)  # found even between log points
    # the loss is checked before each checkpoint, so no NaN state reached one (the next was due at step 4)
    assert torch.load(tmp_path / "work" / CHECKPOINT, weights_only=True)["step"] == 2


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler")  # fp16: the scaler skips a step
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_keeps_fp32_trainables(tmp_path, precision):
    method, summary, rows = toy_run(tmp_path, mixed_precision=precision, checkpoint_every=0)
    assert method.model.weight.dtype == torch.float32
    assert summary["mixed_precision"] == precision and len(rows) == 6


def test_scale_lr_multiplies_by_accumulation_and_batch(tmp_path):
    # diffusers' --scale_lr on one GPU: lr x gradient_accumulation_steps x train_batch_size
    _, _, plain = toy_run(tmp_path / "a", gradient_accumulation_steps=4, batch_size=3)
    _, _, scaled = toy_run(tmp_path / "b", gradient_accumulation_steps=4, batch_size=3, scale_lr=True)
    assert {r["lr"] for r in plain} == {0.05}
    assert [r["lr"] for r in scaled] == pytest.approx([0.05 * 4 * 3] * 6)


def test_a_method_counts_its_batch_for_scale_lr(tmp_path):
    class Doubled(Toy):
        def scaled_batch(self, batch_size):
            return 2 * batch_size

    spec = {"seed": 0, "train": {"steps": 1, "learning_rate": 0.05, "scale_lr": True, "batch_size": 2,
                                 "checkpoint_every": 0, "log_every": 1}}
    ctx = TrainContext(spec=spec, base_model=tmp_path, data_dir=tmp_path, class_dir=None,
                       device=torch.device("cpu"), mixed_precision="no")
    train(Doubled({}), ctx, train_config(spec), tmp_path / "work")
    assert read_jsonl(tmp_path / "work" / "loss_log.jsonl")[0]["lr"] == pytest.approx(0.05 * 2 * 2)


def test_max_grad_norm_null_clips_nothing(tmp_path, monkeypatch):
    calls = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    toy_run(tmp_path / "a", steps=2, checkpoint_every=0)
    assert calls == [1.0, 1.0]  # the schema's default clips every step
    calls.clear()
    toy_run(tmp_path / "b", steps=2, checkpoint_every=0, max_grad_norm=None)
    assert calls == []


def test_image_latents_encode_the_mirrored_images_and_draw_both(tiny_pipeline_dir, instance_dir):
    from conceptbench.train.method import (ImageLatents, encode_latent_distribution, load_base_pipeline,
                                           load_image_folder, sample_latents)

    vae = load_base_pipeline(tiny_pipeline_dir).vae
    images = load_image_folder(instance_dir, 64)
    cpu = torch.device("cpu")
    plain, flipped = ImageLatents(vae, images, cpu), ImageLatents(vae, images, cpu, flip=True)
    mirrored, _ = encode_latent_distribution(vae, images.flip(-1), cpu)
    torch.testing.assert_close(flipped.mean[3:], mirrored, atol=1e-5, rtol=1e-4)
    # Without flips a draw takes the generator's values as before flips existed: indices, then noise.
    g, h = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    idx = torch.randint(0, 3, (5,), generator=h)
    assert torch.equal(plain.draw(5, g), sample_latents(plain.mean[idx], plain.std[idx], h))
    rows = flipped.indices(200, torch.Generator().manual_seed(1))
    assert 60 < int((rows >= 3).sum()) < 140 and set(rows.tolist()) == set(range(6))


def test_config_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="unknown train settings"):
        train_config({"train": {"steps": 1, "learning_rate": 1.0, "checkpointing_every": 3}})
    with pytest.raises(ConfigError, match="lack"):
        train_config({"train": {"steps": 1}})
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if the 8bit extra were not installed
    with pytest.raises(ImportError, match=r"needs bitsandbytes: pip install 'conceptbench\[8bit\]'"):
        toy_run(tmp_path, optimizer="adamw8bit")


def test_a_latent_draw_is_the_vaes_posterior_sample_scaled_for_the_unet(tiny_pipeline_dir, instance_dir):
    """A drawn latent is what diffusers' training scripts feed the U-Net, latent_dist.sample() times
    vae.config.scaling_factor, with the same noise: neither the posterior's mean alone nor a mean or
    spread left unscaled, each of which trains on latents the sampler never decodes."""
    from conceptbench.train.method import ImageLatents, load_base_pipeline, load_image_folder

    vae = load_base_pipeline(tiny_pipeline_dir).vae
    images = load_image_folder(instance_dir, 64)
    with torch.no_grad():
        dist = vae.encode(images).latent_dist
    scale = vae.config.scaling_factor
    assert scale == pytest.approx(0.18215) and dist.std.mean() > 0.1  # SD's factor; a posterior with spread
    latents = ImageLatents(vae, images, torch.device("cpu"))
    drawn = latents.draw_rows(torch.arange(3), torch.Generator().manual_seed(5))
    expected = dist.sample(generator=torch.Generator().manual_seed(5)) * scale
    torch.testing.assert_close(drawn, expected, atol=1e-5, rtol=1e-4)
