"""DreamBooth: the loss, what training touches, and save/reload."""

from __future__ import annotations

import pytest
import torch

from conceptbench.methods import get_method
from conceptbench.methods.dreambooth import DreamBooth, dreambooth_loss
from conceptbench.train import MethodError, TrainContext, train, train_config
from conceptbench.train.method import noise_and_target


def make(spec, base, instance_dir, class_dir):
    ctx = TrainContext(spec=spec, base_model=base, data_dir=instance_dir, class_dir=class_dir,
                       device=torch.device("cpu"), mixed_precision="no")
    return DreamBooth(spec["args"]), ctx


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, module):
    return [k for k, v in module.state_dict().items() if not torch.equal(before[k], v)]


def test_registry_and_argument_errors(tiny_pipeline_dir, instance_dir, dreambooth_spec):
    assert get_method("dreambooth") is DreamBooth
    with pytest.raises(MethodError, match="unknown method 'nope'"):
        get_method("nope")
    del dreambooth_spec["args"]["instance_prompt"]
    method, ctx = make(dreambooth_spec, tiny_pipeline_dir, instance_dir, None)
    with pytest.raises(MethodError, match="dreambooth: args.instance_prompt is required"):
        method.setup(ctx)


def test_loss_is_instance_plus_weighted_prior():
    # Two instance rows and one prior row, each 1x2 "latents".
    pred = torch.zeros(3, 1, 1, 2)
    target = torch.tensor([[1.0, 3.0], [2.0, 0.0], [2.0, 2.0]]).view(3, 1, 1, 2)
    instance = (1 + 9 + 4 + 0) / 4  # 3.5
    prior = (4 + 4) / 2  # 4.0
    assert dreambooth_loss(pred, target, 2, 0.25).item() == pytest.approx(instance + 0.25 * prior)
    assert dreambooth_loss(pred, target, 2, 0.0).item() == pytest.approx(instance)
    assert dreambooth_loss(pred[:2], target[:2], 2, 0.25).item() == pytest.approx(instance)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_target_follows_prediction_type(prediction_type):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noisy, t, target = noise_and_target(scheduler, x0, torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)  # replay the draws: noise first, then timesteps
    noise = torch.randn(x0.shape, generator=g)
    assert torch.equal(t, torch.randint(0, 1000, (2,), generator=g))
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, a.sqrt() * x0 + (1 - a).sqrt() * noise)
    expected = noise if prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
    torch.testing.assert_close(target, expected)


def test_gradient_checkpointing_gives_the_same_step(tiny_pipeline_dir, instance_dir, class_dir, dreambooth_spec,
                                                    tmp_path):
    dreambooth_spec["train"].update(steps=1, checkpoint_every=0)
    weights = []
    for checkpointing in (False, True):
        method, ctx = make(dreambooth_spec, tiny_pipeline_dir, instance_dir, class_dir)
        ctx.gradient_checkpointing = checkpointing
        train(method, ctx, train_config(dreambooth_spec), tmp_path / f"work-{checkpointing}")
        assert method.unet.is_gradient_checkpointing == checkpointing
        weights.append(method.unet.state_dict())
    for k, v in weights[0].items():
        torch.testing.assert_close(weights[1][k], v)


def test_8bit_adamw_follows_adamw_with_uint8_state(tiny_pipeline_dir, instance_dir, class_dir, dreambooth_spec,
                                                    tmp_path, monkeypatch):
    """bitsandbytes' AdamW8bit keeps both moments of every tensor of ≥ 4,096 elements in uint8 (block-wise
    quantised) and still moves the weights as AdamW does: after 3 steps the updates differ from AdamW's by a
    few percent of their size (another optimizer, or another learning rate, would not)."""
    from conceptbench.train import core

    pytest.importorskip("bitsandbytes", reason="the optional 8bit extra (make test installs it)")
    dreambooth_spec["train"].update(steps=3, checkpoint_every=0, learning_rate=1e-4)
    made = []
    real = core.make_optimizer
    monkeypatch.setattr(core, "make_optimizer", lambda cfg, groups: made.append(real(cfg, groups)) or made[-1])
    updates = {}
    for name in ("adamw", "adamw8bit"):
        method, ctx = make(dreambooth_spec, tiny_pipeline_dir, instance_dir, class_dir)
        method.setup(ctx)
        before = snapshot(method.unet)
        monkeypatch.setattr(method, "setup", lambda ctx: None)  # keep the weights read above
        train(method, ctx, train_config({"train": {**dreambooth_spec["train"], "optimizer": name}}), tmp_path / name)
        updates[name] = {k: v - before[k] for k, v in method.unet.state_dict().items()}
    adamw, adamw8bit = made
    big = [p for p in adamw8bit.state if p.numel() >= 4096]
    assert big and all(adamw8bit.state[p][k].dtype == torch.uint8 for p in big for k in ("state1", "state2"))
    assert all(s["exp_avg"].dtype == torch.float32 for s in adamw.state.values())
    diff = sum((updates["adamw8bit"][k] - u).norm() ** 2 for k, u in updates["adamw"].items()) ** 0.5
    size = sum(u.norm() ** 2 for u in updates["adamw"].values()) ** 0.5
    assert size > 0 and diff / size < 0.05, float(diff / size)


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_only_trainable_modules_change(tiny_pipeline_dir, instance_dir, class_dir, dreambooth_spec,
                                       tmp_path, train_text_encoder):
    dreambooth_spec["args"]["train_text_encoder"] = train_text_encoder
    dreambooth_spec["train"].update(steps=1, learning_rate=1e-3, checkpoint_every=0)
    method, ctx = make(dreambooth_spec, tiny_pipeline_dir, instance_dir, class_dir)
    method.setup(ctx)
    unet, text, vae = snapshot(method.unet), snapshot(method.text_encoder), snapshot(method.vae)
    method.setup = lambda ctx: None  # keep the models snapshotted above
    summary = train(method, ctx, train_config(dreambooth_spec), tmp_path / "work")

    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    expected = count(method.unet) + (count(method.text_encoder) if train_text_encoder else 0)
    assert summary["trainable_params"] == expected
    assert len(changed(unet, method.unet)) > 0.9 * len(unet)
    assert changed(vae, method.vae) == []
    text_changed = changed(text, method.text_encoder)
    assert bool(text_changed) == train_text_encoder


def test_prior_term_only_with_class_images_and_weight(tiny_pipeline_dir, instance_dir, class_dir, dreambooth_spec):
    g = torch.Generator().manual_seed(0)
    for class_folder, weight, rows in [(class_dir, 0.25, 2), (class_dir, 0.0, 1), (None, 0.25, 1)]:
        dreambooth_spec["args"]["prior_loss_weight"] = weight
        method, ctx = make(dreambooth_spec, tiny_pipeline_dir, instance_dir, class_folder)
        method.setup(ctx)
        batch = method.batch(0, g)
        assert batch["noisy"].shape[0] == rows
        assert batch["prompt_index"].tolist() == list(range(rows))


def test_loss_falls_when_overfitting_one_batch(tiny_pipeline_dir, instance_dir, class_dir, dreambooth_spec, overfit):
    method, ctx = make(dreambooth_spec, tiny_pipeline_dir, instance_dir, class_dir)
    losses = overfit(method, ctx, torch.optim.AdamW, lr=1e-3, steps=20)
    assert losses[-1] < 0.3 * losses[0], losses


def test_saved_pipeline_reloads_to_same_images(tiny_pipeline_dir, instance_dir, class_dir, dreambooth_spec, tmp_path):
    dreambooth_spec["train"].update(steps=2, learning_rate=1e-3, checkpoint_every=0)
    method, ctx = make(dreambooth_spec, tiny_pipeline_dir, instance_dir, class_dir)
    train(method, ctx, train_config(dreambooth_spec), tmp_path / "work")
    method.save(tmp_path / "artifact")
    assert (tmp_path / "artifact" / "unet" / "diffusion_pytorch_model.safetensors").exists()

    def images(pipe):
        out = pipe("a photo of sks cat", generator=torch.Generator().manual_seed(3), num_inference_steps=2,
                   height=64, width=64, output_type="np")
        return out.images

    trained = images(method.pipeline())
    reloaded = DreamBooth.load_pipeline(tmp_path / "artifact", tiny_pipeline_dir, dreambooth_spec, torch.device("cpu"))
    base = DreamBooth.load_pipeline(tiny_pipeline_dir, tiny_pipeline_dir, dreambooth_spec, torch.device("cpu"))
    assert (images(reloaded) == trained).all()
    assert not (images(base) == trained).all()  # training changed what the pipeline draws


def test_class_rows_are_the_class_folder_under_the_class_prompt(tiny_pipeline_dir, instance_dir, class_dir,
                                                                 dreambooth_spec):
    """Prior preservation regularises with the class images under the class prompt: neither the instance
    images nor the instance prompt may stand in for them, which would train the subject twice and
    preserve nothing of the class."""
    from conceptbench.train.method import encode_latent_distribution, encode_prompts, load_image_folder

    method, ctx = make(dreambooth_spec, tiny_pipeline_dir, instance_dir, class_dir)
    method.setup(ctx)
    for part, folder in ((method.instance, instance_dir), (method.klass, class_dir)):
        mean, std = encode_latent_distribution(method.vae, load_image_folder(folder, 64), torch.device("cpu"))
        torch.testing.assert_close(part.mean, mean)
        torch.testing.assert_close(part.std, std)
    with torch.no_grad():
        expected = encode_prompts(method.tokenizer, method.text_encoder, ["a photo of sks cat", "a photo of a cat"])
    torch.testing.assert_close(method.prompt_embeds, expected)


def test_the_prior_weight_scales_only_the_class_half_of_a_batch(tiny_pipeline_dir, instance_dir, class_dir,
                                                                 dreambooth_spec):
    """With batch_size 2 a batch is 2 instance rows, then 2 class rows, and its loss is the instance rows'
    MSE plus λ times the class rows' MSE. Counting the class rows as instance rows would train them at
    full weight whatever λ says, flattening the prior_loss_weight sweep."""
    dreambooth_spec["train"]["batch_size"] = 2
    method, ctx = make(dreambooth_spec, tiny_pipeline_dir, instance_dir, class_dir)
    method.setup(ctx)
    g = torch.Generator().manual_seed(0)
    batch = method.batch(0, g)
    assert batch["prompt_index"].tolist() == [0, 0, 1, 1]
    with torch.no_grad():
        loss = method.loss(batch, g)
        cond = method.prompt_embeds[[0, 0, 1, 1]]
        err = (method.unet(batch["noisy"], batch["timesteps"], cond).sample - batch["target"]) ** 2
    torch.testing.assert_close(loss, err[:2].mean() + 0.25 * err[2:].mean())
