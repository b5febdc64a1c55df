"""Custom Diffusion: what each variant trains, the saved weights in a fresh pipeline, multi-concept, the loss."""

from __future__ import annotations

import copy

import pytest
import torch

from conceptbench.methods import get_method
from conceptbench.methods.custom_diffusion import CustomDiffusion
from conceptbench.train import MethodError, TrainContext, train, train_config

SPEC = {
    "experiment": "custom_diffusion", "variant": "params-crossattn_kv", "method": "custom_diffusion", "seed": 0,
    "resolution": 64,
    "train": {"steps": 2, "learning_rate": 1e-2, "checkpoint_every": 0, "log_every": 1},
    "args": {"modifier_token": "<new1>", "initializer_token": "cat", "instance_prompt": "photo of a <new1> cat",
             "class_prompt": "cat", "train_params": "crossattn_kv", "prior_loss_weight": 1.0},
}
EMB = "embeddings.token_embedding.weight"


def make(base, data, class_dir, inputs=None, **args):
    spec = copy.deepcopy(SPEC)
    spec["args"].update(args)
    ctx = TrainContext(spec=spec, base_model=base, data_dir=data, class_dir=class_dir, device=torch.device("cpu"),
                       mixed_precision="no", inputs=inputs or {})
    return CustomDiffusion(spec["args"]), ctx, spec


def images(pipe, prompt="<new1> cat in the park"):
    return pipe(prompt, generator=torch.Generator().manual_seed(3), num_inference_steps=2, height=64, width=64,
                output_type="np").images


@pytest.mark.parametrize("variant, trained", [("crossattn_kv", {"to_k", "to_v"}),
                                              ("crossattn", {"to_q", "to_k", "to_v", "to_out"})])
def test_only_cross_attention_projections_and_the_modifier_row_change(tiny_pipeline_dir, instance_dir, class_dir,
                                                                      tmp_path, variant, trained):
    method, ctx, spec = make(tiny_pipeline_dir, instance_dir, class_dir, train_params=variant)
    method.setup(ctx)
    unet = {k: v.clone() for k, v in method.unet.state_dict().items()}
    text = {k: v.clone() for k, v in method.text_encoder.state_dict().items()}
    method.setup = lambda ctx: None
    summary = train(method, ctx, train_config(spec), tmp_path / "work")
    method.pipeline()

    changed = [k for k, v in method.unet.state_dict().items() if not torch.equal(v, unet[k])]
    assert changed and all(".attn2.processor." in k for k in changed), changed
    assert {k.split(".processor.")[1].split("_custom_diffusion")[0] for k in changed} == trained
    n_layers = sum(k.endswith("attn2.processor") for k in method.unet.attn_processors)
    assert len({k.split(".processor.")[0] for k in changed}) == n_layers  # every cross-attention layer
    after = method.text_encoder.state_dict()
    assert [k for k, v in after.items() if not torch.equal(v, text[k])] == [EMB]
    assert (after[EMB] != text[EMB]).any(1).nonzero().flatten().tolist() == method.tokens.ids
    projections = sum(p.numel() for proc in method.processors.values() for p in proc.parameters())
    assert summary["trainable_params"] == projections + method.tokens.vectors.numel()


def test_saved_weights_give_the_same_images_in_a_fresh_pipeline(tiny_pipeline_dir, instance_dir, class_dir, tmp_path):
    method, ctx, spec = make(tiny_pipeline_dir, instance_dir, class_dir)
    train(method, ctx, train_config(spec), tmp_path / "work")
    (tmp_path / "artifact").mkdir()
    method.save(tmp_path / "artifact")
    assert sorted(p.name for p in (tmp_path / "artifact").iterdir()) == [
        "modifier_0.safetensors", "pytorch_custom_diffusion_weights.safetensors"]

    trained = images(method.pipeline())
    loaded = CustomDiffusion.load_pipeline(tmp_path / "artifact", tiny_pipeline_dir, spec, torch.device("cpu"))
    assert (images(loaded) == trained).all()
    base = get_method("dreambooth").load_pipeline(tiny_pipeline_dir, tiny_pipeline_dir, spec, torch.device("cpu"))
    base.load_textual_inversion(str(tmp_path / "artifact" / "modifier_0.safetensors"))
    assert not (images(base) == trained).all()  # the projections matter, not only the token


def test_multi_concept_trains_two_modifier_tokens_jointly(tiny_pipeline_dir, instance_dir, class_dir, tmp_path):
    extra = [{"modifier_token": "<new2>", "initializer_token": "sofa", "instance_prompt": "photo of a <new2> sofa",
              "class_prompt": "sofa"}]
    inputs = {"data_1": class_dir, "class_images_1": instance_dir}  # any two folders stand in for the second concept
    method, ctx, spec = make(tiny_pipeline_dir, instance_dir, class_dir, inputs=inputs, extra_concepts=extra)
    method.setup(ctx)
    batch = method.batch(0, torch.Generator().manual_seed(0))
    prompts = [method.prompts[i] for i in batch["prompt_index"].tolist()]
    assert prompts[0].endswith("photo of a <new1> cat") and prompts[1].endswith("photo of a <new2> sofa")
    assert prompts[2] == "cat" and prompts[3].startswith("a cat, crop ")  # class_images_1 has captions
    assert batch["n_instance"] == 2
    initial = method.tokens.vectors.detach().clone()
    method.setup = lambda ctx: None
    train(method, ctx, train_config(spec), tmp_path / "work")
    assert (method.tokens.vectors.detach() != initial).any(1).tolist() == [True, True]
    (tmp_path / "artifact").mkdir()
    method.save(tmp_path / "artifact")
    loaded = CustomDiffusion.load_pipeline(tmp_path / "artifact", tiny_pipeline_dir, spec, torch.device("cpu"))
    prompt = "<new1> cat sitting on <new2> sofa"
    assert (images(loaded, prompt) == images(method.pipeline(), prompt)).all()

    with pytest.raises(MethodError, match="extra_concepts.0 has no input data_1"):
        make(tiny_pipeline_dir, instance_dir, class_dir, extra_concepts=extra)[0].setup(ctx.__class__(
            **{**ctx.__dict__, "inputs": {}}))


def test_loss_falls_when_overfitting_one_batch(tiny_pipeline_dir, instance_dir, overfit):
    method, ctx, _ = make(tiny_pipeline_dir, instance_dir, None)
    losses = overfit(method, ctx, torch.optim.Adam, lr=3e-2, steps=20)
    # The tiny U-Net's cross-attention carries little of its output: the loss levels off about 10 % lower.
    assert losses[-1] < 0.93 * losses[0], [round(x, 4) for x in losses]
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 17, [round(x, 4) for x in losses]


def test_argument_errors(tiny_pipeline_dir, instance_dir, class_dir):
    for args, message in [({"train_params": "all"}, "train_params must be one of"),
                          ({"instance_prompt": "photo of a cat"}, "lacks '<new1>'"),
                          ({"modifier_token": None}, "args.modifier_token is required")]:
        method, ctx, _ = make(tiny_pipeline_dir, instance_dir, class_dir, **args)
        with pytest.raises(MethodError, match=message):
            method.setup(ctx)


def test_rescale_places_the_image_and_masks_its_inner_cells():
    from conceptbench.methods.custom_diffusion import rescale

    image = torch.rand(3, 64, 64) * 2 - 1
    canvas, mask = rescale(image, scale=30, top=4, left=10, factor=2)  # 64 px, latents 32 x 32
    assert canvas.shape == (3, 64, 64) and mask.shape == (32, 32)
    assert canvas[:, :4].abs().sum() == 0 and canvas[:, 34:].abs().sum() == 0 and canvas[:, :, :10].abs().sum() == 0
    assert canvas[:, 4:34, 10:40].abs().sum() > 0
    rows, cols = mask.nonzero()[:, 0], mask.nonzero()[:, 1]
    # cells top//f + 1 .. (top + scale)//f - 2: one cell in from the image's edge on every side
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (3, 15, 6, 18)
    assert mask.sum() == 13 * 13
    big, full = rescale(image, scale=80, top=5, left=7, factor=2)
    assert big.shape == (3, 64, 64) and full.sum() == 32 * 32


def test_rescale_draws_and_size_words_follow_the_reference():
    from conceptbench.methods.custom_diffusion import LARGE_PREFIXES, SMALL_PREFIXES, rescale_draws, size_word

    import numpy as np

    draws = rescale_draws(3000, 64, np.random.default_rng(0))
    scales = torch.tensor([d[0] for d in draws])
    small = scales <= 64
    assert 0.62 < small.float().mean() < 0.70  # two draws in three shrink
    assert scales[small].min() >= 21 and scales[small].max() <= 64  # [R/3, R]
    assert scales[~small].min() >= 76 and scales[~small].max() <= 88  # [1.2R, 1.4R)
    for scale, top, left, _ in draws:
        assert 0 <= top <= abs(scale - 64) and 0 <= left <= abs(scale - 64)
    assert [size_word(s, 64, w) for s, w in [(38, 0), (38, 1), (39, 0), (64, 1), (65, 0), (65, 1)]] == [1, 2, 0, 0, 3, 4]
    assert SMALL_PREFIXES == ("a far away ", "very small ") and LARGE_PREFIXES == ("zoomed in ", "close up ")


def test_masked_instance_loss_sums_channels_over_the_masked_cells():
    from conceptbench.methods.custom_diffusion import custom_diffusion_loss

    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    ones = torch.ones(2, 1, 8, 8)
    prior = torch.nn.functional.mse_loss(pred[2:], target[2:])
    inst = torch.nn.functional.mse_loss(pred[:2], target[:2])
    # The reference's mask sum has one channel, the error four: 4 x the MSE where the mask is full.
    torch.testing.assert_close(custom_diffusion_loss(pred, target, 2, 0.5, ones), 4 * inst + 0.5 * prior)
    torch.testing.assert_close(custom_diffusion_loss(pred, target, 2, 0.5), inst + 0.5 * prior)
    mask = ones.clone()
    mask[:, :, :, 4:] = 0
    moved = pred.clone()
    moved[:2, :, :, 4:] += 10.0  # outside the mask: no effect
    assert custom_diffusion_loss(moved, target, 2, 0.5, mask) == custom_diffusion_loss(pred, target, 2, 0.5, mask)
    per_image = ((pred[:2, :, :, :4] - target[:2, :, :, :4]) ** 2).sum((1, 2, 3)) / 32
    torch.testing.assert_close(custom_diffusion_loss(pred, target, 2, 0.0, mask), per_image.mean())


def test_augmented_batches_pair_each_prompt_with_its_scale(tiny_pipeline_dir, instance_dir, class_dir):
    method, ctx, spec = make(tiny_pipeline_dir, instance_dir, class_dir)
    spec["train"]["batch_size"] = 2
    method.setup(ctx)
    assert method.augment and method.instance[0].shape == (3, 3, 64, 64)  # pixels, rescaled every step
    seen = set()
    for step in range(12):
        g = torch.Generator().manual_seed(step)
        batch = method.batch(step, g)
        assert batch["mask"].shape == (2, 1, 32, 32) and batch["noisy"].shape[0] == 4
        for row, mask in zip(batch["prompt_index"][:2].tolist(), batch["mask"]):
            prompt = method.prompts[row]
            assert prompt.endswith("photo of a <new1> cat")
            word = prompt[: -len("photo of a <new1> cat")]
            seen.add(word)
            if word in ("zoomed in ", "close up "):
                assert mask.sum() == 32 * 32  # larger than the canvas: every cell counts
            else:
                assert 0 < mask.sum() < 31 * 31  # on the canvas: its cells only, one in from the edge
    assert len(seen) >= 3, seen
    plain, ctx, spec = make(tiny_pipeline_dir, instance_dir, class_dir, augment=False)
    spec["train"]["batch_size"] = 2
    plain.setup(ctx)
    batch = plain.batch(0, torch.Generator().manual_seed(0))
    assert batch["mask"] is None and [plain.prompts[i] for i in batch["prompt_index"][:2]] == ["photo of a <new1> cat"] * 2


@pytest.mark.parametrize("own", [True, False])
def test_class_images_train_with_their_own_captions(tiny_pipeline_dir, instance_dir, own):
    # instance_dir stands in for retrieved images: its metadata.jsonl gives "a cat, crop i" for image i
    method, ctx, spec = make(tiny_pipeline_dir, instance_dir, instance_dir, class_captions=own, augment=False)
    spec["train"]["batch_size"] = 2
    method.setup(ctx)
    g = torch.Generator().manual_seed(0)
    batch = method.batch(0, g)
    g = torch.Generator().manual_seed(0)
    method.instance[0].indices(2, g)
    method.instance[0].draw_rows(torch.zeros(2, dtype=torch.long), g)
    drawn = method.klass[0].indices(2, g).tolist()  # the class images this batch drew
    prompts = [method.prompts[i] for i in batch["prompt_index"][2:].tolist()]
    assert prompts == ([f"a cat, crop {i}" for i in drawn] if own else ["cat", "cat"])


def test_scale_lr_counts_the_class_half(tiny_pipeline_dir, instance_dir, class_dir, tmp_path):
    # train_custom_diffusion.py --scale_lr: lr x accumulation x batch, doubled with prior preservation
    method, ctx, spec = make(tiny_pipeline_dir, instance_dir, class_dir, augment=False)
    spec["train"].update(steps=1, scale_lr=True, batch_size=2, learning_rate=1e-5)
    train(method, ctx, train_config(spec), tmp_path / "work")
    from conceptbench.io import read_jsonl

    assert read_jsonl(tmp_path / "work" / "loss_log.jsonl")[0]["lr"] == pytest.approx(1e-5 * 2 * 2)
    assert method.scaled_batch(2) == 4


@pytest.mark.parametrize("variant", ["crossattn_kv", "crossattn"])
def test_the_processors_start_as_the_layers_own_projections(tiny_pipeline_dir, instance_dir, class_dir, variant):
    """Before the first step the U-Net with its Custom Diffusion processors computes what the base U-Net
    does: each trained projection starts from its own layer's weights (to_k from to_k, to_v from to_v, ...),
    so training fine-tunes the base model, not a perturbed one."""
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0

    from conceptbench.train.method import load_base_pipeline

    method, ctx, _ = make(tiny_pipeline_dir, instance_dir, class_dir, train_params=variant)
    method.setup(ctx)
    installed = method.unet.attn_processors
    assert method.processors and all(installed[k] is p for k, p in method.processors.items())
    assert all(isinstance(p, CustomDiffusionAttnProcessor2_0) for p in method.processors.values())
    base = load_base_pipeline(tiny_pipeline_dir).unet
    g = torch.Generator().manual_seed(0)
    x, t, cond = torch.randn(2, 4, 32, 32, generator=g), torch.tensor([10, 700]), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(method.unet(x, t, cond).sample, base(x, t, cond).sample, atol=1e-5, rtol=1e-4)


def test_each_modifier_token_starts_at_its_own_initializer(tiny_pipeline_dir, instance_dir, class_dir):
    """Each concept's modifier row starts at its own initializer's embedding, the mean of its tokens' rows
    when it splits into several (the study's "ktn" is two CLIP tokens), not the first concept's word."""
    extra = [{"modifier_token": "<new2>", "initializer_token": "sofa", "instance_prompt": "photo of a <new2> sofa",
              "class_prompt": "sofa"}]
    inputs = {"data_1": class_dir, "class_images_1": instance_dir}
    method, ctx, _ = make(tiny_pipeline_dir, instance_dir, class_dir, inputs=inputs, extra_concepts=extra,
                          initializer_token="ktn")
    method.setup(ctx)
    rows = method.text_encoder.get_input_embeddings().weight.detach()
    ids = {w: method.tokenizer.encode(w, add_special_tokens=False) for w in ("ktn", "sofa")}
    assert len(ids["ktn"]) == 2
    expected = torch.stack([rows[ids["ktn"]].mean(0), rows[ids["sofa"]].mean(0)])
    torch.testing.assert_close(method.tokens.vectors.detach(), expected)


def test_random_flip_mirrors_about_half_of_the_rescaled_instance_images(tiny_pipeline_dir, instance_dir, class_dir,
                                                                       monkeypatch):
    """train.random_flip (the study's --hflip) mirrors the instance images drawn, before their rescale, about
    one in two; without it none is mirrored."""
    from conceptbench.methods import custom_diffusion

    seen = []
    real = custom_diffusion.rescale
    monkeypatch.setattr(custom_diffusion, "rescale", lambda image, *a: seen.append(image) or real(image, *a))
    for flip in (True, False):
        method, ctx, spec = make(tiny_pipeline_dir, instance_dir, class_dir)
        spec["train"].update(batch_size=2, random_flip=flip)
        method.setup(ctx)
        images = method.instance[0]
        seen.clear()
        for step in range(10):
            method.batch(step, torch.Generator().manual_seed(step))
        plain = [any(torch.equal(s, im) for im in images) for s in seen]
        mirrored = [any(torch.equal(s, im.flip(-1)) for im in images) for s in seen]
        assert len(seen) == 20 and all(p != m for p, m in zip(plain, mirrored))
        assert (5 <= sum(mirrored) <= 15) if flip else sum(mirrored) == 0, sum(mirrored)


def test_mirrored_class_images_keep_their_own_captions(tiny_pipeline_dir, instance_dir):
    """With train.random_flip the class latents are drawn from the images and their mirrors (rows N..2N-1),
    and a mirrored row is trained under its image's caption."""
    # instance_dir stands in for retrieved images: its metadata.jsonl gives "a cat, crop i" for image i
    method, ctx, spec = make(tiny_pipeline_dir, instance_dir, instance_dir, augment=False)
    spec["train"].update(batch_size=2, random_flip=True)
    method.setup(ctx)
    assert method.klass[0].flip
    drawn = []
    for step in range(6):
        batch = method.batch(step, torch.Generator().manual_seed(step))
        g = torch.Generator().manual_seed(step)  # replay the draws: instance rows and their latents, then class rows
        method.instance[0].draw(2, g)
        rows = method.klass[0].indices(2, g).tolist()
        drawn += rows
        assert [method.prompts[i] for i in batch["prompt_index"][2:].tolist()] == [f"a cat, crop {r % 3}" for r in rows]
    assert any(r >= 3 for r in drawn) and any(r < 3 for r in drawn), drawn
