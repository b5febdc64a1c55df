"""LoRA: zero-init adapters change nothing, fused equals unfused, save/load round trip, composition, the α/r
scale and lora_scale, Min-SNR."""

from __future__ import annotations


import pytest
import torch

from conceptbench.methods.lora import LoRA, min_snr_weights, weighted_mse
from conceptbench.methods._lora import add_lora, fuse_loras, save_lora
from conceptbench.models.tiny import SD15_SCHEDULE
from conceptbench.train import TrainContext, train, train_config
from conceptbench.train.method import load_base_pipeline


def unet_inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 4, 32, 32, generator=g), torch.tensor([10, 700]), torch.randn(2, 77, 32, generator=g)


def output(unet):
    with torch.no_grad():
        return unet(*unet_inputs()).sample


def randomised_lora(base, rank=4, seed=1):
    """A base pipeline whose U-Net carries a LoRA with non-zero B (as after training)."""
    pipe = load_base_pipeline(base)
    add_lora(pipe.unet, rank)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return pipe


def test_zero_initialised_lora_leaves_outputs_unchanged(tiny_pipeline_dir):
    unet = load_base_pipeline(tiny_pipeline_dir).unet
    before = output(unet)
    params = add_lora(unet, rank=8)
    assert params and all(p.dtype == torch.float32 and p.requires_grad for p in params)
    assert sum(p.requires_grad for p in unet.parameters()) == len(params)  # the base is frozen
    assert torch.equal(output(unet), before)


def test_merged_lora_equals_unmerged_and_save_load_round_trips(tiny_pipeline_dir, tmp_path):
    pipe = randomised_lora(tiny_pipeline_dir)
    unmerged = output(pipe.unet)
    assert not torch.allclose(unmerged, output(load_base_pipeline(tiny_pipeline_dir).unet), atol=1e-4)
    save_lora(pipe.unet, tmp_path / "a")
    fused = fuse_loras(load_base_pipeline(tiny_pipeline_dir), [(tmp_path / "a", 1.0)])
    assert not any("lora" in n for n, _ in fused.unet.named_parameters())  # plain weights: no overhead
    torch.testing.assert_close(output(fused.unet), unmerged, atol=1e-5, rtol=1e-4)


def test_loras_compose_with_their_weights(tiny_pipeline_dir, tmp_path):
    save_lora(randomised_lora(tiny_pipeline_dir, seed=1).unet, tmp_path / "a")
    save_lora(randomised_lora(tiny_pipeline_dir, rank=8, seed=2).unet, tmp_path / "b")
    base = load_base_pipeline(tiny_pipeline_dir).unet
    only_a = output(fuse_loras(load_base_pipeline(tiny_pipeline_dir), [(tmp_path / "a", 0.5)]).unet)
    split = output(fuse_loras(load_base_pipeline(tiny_pipeline_dir), [(tmp_path / "a", 0.3), (tmp_path / "a", 0.2)]).unet)
    torch.testing.assert_close(split, only_a, atol=1e-5, rtol=1e-4)
    # Weight 0 on b leaves a alone; both at weight 1 differ from either.
    zero_b = output(fuse_loras(load_base_pipeline(tiny_pipeline_dir), [(tmp_path / "a", 0.5), (tmp_path / "b", 0.0)]).unet)
    torch.testing.assert_close(zero_b, only_a, atol=1e-5, rtol=1e-4)
    both = output(fuse_loras(load_base_pipeline(tiny_pipeline_dir), [(tmp_path / "a", 1.0), (tmp_path / "b", 1.0)]).unet)
    assert not torch.allclose(both, only_a, atol=1e-4) and not torch.allclose(both, output(base), atol=1e-4)


def test_min_snr_weights_on_hand_cases():
    snr = torch.tensor([0.5, 5.0, 20.0])
    torch.testing.assert_close(min_snr_weights(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.25]))
    torch.testing.assert_close(min_snr_weights(snr, 5.0, "v_prediction"), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 21]))


def test_trained_lora_saves_loads_and_only_the_adapter_trains(tiny_pipeline_dir, caption_dir, tmp_path):
    spec = {"experiment": "lora", "variant": "rank-4", "method": "lora", "seed": 0, "resolution": 64,
            "train": {"steps": 2, "learning_rate": 1e-2, "batch_size": 2},
            "args": {"rank": 4, "snr_gamma": 5.0, "lora_scale": 1.0}}
    method = LoRA(spec["args"])
    ctx = TrainContext(spec=spec, base_model=tiny_pipeline_dir, data_dir=caption_dir, class_dir=None,
                       device=torch.device("cpu"), mixed_precision="no")
    train(method, ctx, train_config(spec), tmp_path / "work")
    base = load_base_pipeline(tiny_pipeline_dir).unet.state_dict()
    for name, value in method.unet.state_dict().items():
        if "lora" not in name:
            assert torch.equal(value, base[name.replace(".base_layer", "")]), name
    trained = output(method.unet)
    assert not torch.allclose(trained, output(load_base_pipeline(tiny_pipeline_dir).unet), atol=1e-4)
    method.save(tmp_path / "artifact")
    pipe = LoRA.load_pipeline(tmp_path / "artifact", tiny_pipeline_dir, spec, torch.device("cpu"))
    torch.testing.assert_close(output(pipe.unet), trained, atol=1e-5, rtol=1e-4)


def test_the_adapter_init_follows_the_seed_not_the_process_history(tiny_pipeline_dir, caption_dir, tmp_path):
    """peft draws lora_A from the global generator; training seeds it from the spec before setup."""
    def trained(seed, tag):
        spec = {"experiment": "lora", "variant": "rank-4", "method": "lora", "seed": seed, "resolution": 64,
                "train": {"steps": 1, "learning_rate": 1e-2, "checkpoint_every": 0}, "args": {"rank": 4}}
        method = LoRA(spec["args"])
        ctx = TrainContext(spec=spec, base_model=tiny_pipeline_dir, data_dir=caption_dir, class_dir=None,
                           device=torch.device("cpu"), mixed_precision="no")
        torch.randn(7)  # whatever ran before in this process
        train(method, ctx, train_config(spec), tmp_path / tag)
        return {k: v.clone() for k, v in method.unet.state_dict().items() if "lora_A" in k}

    first, again, other = trained(0, "a"), trained(0, "b"), trained(1, "c")
    assert first and all(torch.equal(v, again[k]) for k, v in first.items())
    assert not all(torch.equal(v, other[k]) for k, v in first.items())


@pytest.mark.parametrize("flip", [False, True])
def test_cached_encodings_train_as_encoding_each_batch(tiny_pipeline_dir, caption_dir, tmp_path, monkeypatch, flip):
    """With cache_latents the VAE encodes each image once, at setup, not each step, and 4 steps end where
    4 steps of encoding every batch end: the same images and noise drawn, encodings equal up to float
    rounding (a chunk of 4 images against batches of 2). With train.random_flip the cache holds the
    mirrored images' encodings too, and both paths mirror the same draws."""
    from diffusers import AutoencoderKL

    encodes = []
    real = AutoencoderKL.encode
    monkeypatch.setattr(AutoencoderKL, "encode", lambda self, x, *a, **k: encodes.append(len(x)) or real(self, x, *a, **k))
    adapters, calls = {}, {}
    for cache in (False, True):
        spec = {"experiment": "lora", "variant": "rank-4", "method": "lora", "seed": 0, "resolution": 64,
                "train": {"steps": 4, "learning_rate": 1e-2, "batch_size": 2, "checkpoint_every": 0,
                          "random_flip": flip},
                "args": {"rank": 4, "cache_latents": cache}}
        method = LoRA(spec["args"])
        ctx = TrainContext(spec=spec, base_model=tiny_pipeline_dir, data_dir=caption_dir, class_dir=None,
                           device=torch.device("cpu"), mixed_precision="no")
        encodes.clear()
        train(method, ctx, train_config(spec), tmp_path / f"work-{cache}")
        adapters[cache] = {k: v for k, v in method.unet.state_dict().items() if "lora" in k}
        calls[cache] = list(encodes)
    assert calls == {False: [2, 2, 2, 2], True: [4, 4] if flip else [4]}  # a batch per step; the 4 images once
    for k, v in adapters[False].items():
        torch.testing.assert_close(adapters[True][k], v, atol=1e-5, rtol=1e-4)
    assert all(v.abs().sum() > 0 for k, v in adapters[True].items() if "lora_B" in k)  # trained away from zero


def test_random_flip_mirrors_the_images_drawn(tiny_pipeline_dir, caption_dir):
    """A flipped draw is the encoding of the mirrored image (not the mirrored latent), and about half are flipped."""
    from conceptbench.methods._captioned import CaptionedImages, EncodedCaptions
    from conceptbench.train.method import encode_latent_distribution

    pipe = load_base_pipeline(tiny_pipeline_dir)
    data = CaptionedImages(caption_dir, 64)
    cached = EncodedCaptions(data, pipe.vae, pipe.tokenizer, pipe.text_encoder, torch.device("cpu"), flip=True)
    pixels = torch.stack([data.load(i) for i in range(len(data))])
    mirrored, _ = encode_latent_distribution(pipe.vae, pixels.flip(-1), torch.device("cpu"))
    torch.testing.assert_close(cached.latents.mean[len(data):], mirrored, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(mirrored, cached.latents.mean[: len(data)].flip(-1), atol=1e-3)  # the VAE is no mirror
    g = torch.Generator().manual_seed(0)
    drawn, _ = data.draw(64, g, flip=True)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(data), (64,), generator=g)
    flips = torch.randint(0, 2, (64,), generator=g).bool()
    assert 16 < int(flips.sum()) < 48
    for k in range(64):
        expect = data.load(int(idx[k]))
        assert torch.equal(drawn[k], expect.flip(-1) if flips[k] else expect)


def test_adapter_stays_fp32_over_a_bf16_base(tiny_pipeline_dir, caption_dir, tmp_path):
    spec = {"seed": 0, "resolution": 64, "train": {"steps": 1, "learning_rate": 1e-3, "mixed_precision": "bf16"},
            "args": {"rank": 4}}
    method = LoRA(spec["args"])
    ctx = TrainContext(spec=spec, base_model=tiny_pipeline_dir, data_dir=caption_dir, class_dir=None,
                       device=torch.device("cpu"), mixed_precision="bf16")
    summary = train(method, ctx, train_config(spec), tmp_path / "work")
    assert summary["final_loss"] is not None
    assert {p.dtype for p in method.params} == {torch.float32}
    assert method.unet.conv_in.weight.dtype == torch.bfloat16


def test_a_rank_larger_than_the_layer_is_refused_by_name(tiny_pipeline_dir):
    from conceptbench.train.method import MethodError

    unet = load_base_pipeline(tiny_pipeline_dir).unet
    smallest = min(min(m.in_features, m.out_features) for n, m in unet.named_modules()
                   if isinstance(m, torch.nn.Linear) and n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0")))
    assert len(add_lora(unet, smallest)) > 0  # the largest rank that fits is accepted
    unet = load_base_pipeline(tiny_pipeline_dir).unet
    with pytest.raises(MethodError, match=rf"lora: rank {smallest + 1} is larger than layer \S+to_\w+"):
        add_lora(unet, smallest + 1)


def test_a_drawn_image_comes_with_its_own_caption(caption_dir):
    """Images read when drawn (LCM's default; LoRA without cache_latents) come with their own captions, in
    the order drawn: a batch whose captions are reordered trains each image under another one's text."""
    from conceptbench.methods._captioned import CaptionedImages

    data = CaptionedImages(caption_dir, 64)
    pixels, captions = data.draw(32, torch.Generator().manual_seed(0))
    assert len(set(captions)) == 4
    for image, caption in zip(pixels, captions):
        assert torch.equal(image, data.load(int(caption.rsplit(" ", 1)[1]))), caption  # "a drawing number i"


def lora_layer(unet):
    """The first adapted to_q of `unet`: (its name, its peft LoRA module)."""
    from peft.tuners.lora import Linear as LoraLinear

    return next((n, m) for n, m in unet.named_modules() if isinstance(m, LoraLinear) and n.endswith(".to_q"))


@pytest.mark.parametrize("alpha, scale", [(None, 1.0), (2.0, 0.5), (16.0, 4.0)])
def test_the_adapter_update_is_b_times_a_scaled_by_alpha_over_rank(tiny_pipeline_dir, alpha, scale):
    """lora_alpha null means α = r (scale 1), whatever the rank: with α fixed instead, the study's ranks 4, 8
    and 16 would train updates of different scales and the rank sweep would measure the learning rate."""
    unet = load_base_pipeline(tiny_pipeline_dir).unet
    add_lora(unet, rank=4, alpha=alpha)
    _, layer = lora_layer(unet)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.lora_B["default"].weight.copy_(torch.randn(layer.lora_B["default"].weight.shape, generator=g))
        x = torch.randn(3, layer.base_layer.in_features, generator=g)
        update = layer(x) - layer.base_layer(x)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(update, scale * x @ a.T @ b.T, atol=1e-5, rtol=1e-4)


def test_a_saved_adapter_keeps_its_alpha(tiny_pipeline_dir, tmp_path):
    """The artifact carries α: loaded back and fused, an adapter with α ≠ r gives the outputs it had in
    training, not those of the scale r/r = 1 the loader would otherwise assume."""
    pipe = load_base_pipeline(tiny_pipeline_dir)
    add_lora(pipe.unet, rank=4, alpha=16.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    trained = output(pipe.unet)
    save_lora(pipe.unet, tmp_path / "a")
    fused = fuse_loras(load_base_pipeline(tiny_pipeline_dir), [(tmp_path / "a", 1.0)])
    torch.testing.assert_close(output(fused.unet), trained, atol=1e-5, rtol=1e-4)


def test_lora_scale_weights_the_fused_update(tiny_pipeline_dir, tmp_path):
    """args.lora_scale is the adapter's weight at sampling: each fused projection is W + lora_scale · B A."""
    pipe = randomised_lora(tiny_pipeline_dir)
    name, layer = lora_layer(pipe.unet)
    update = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach()
    save_lora(pipe.unet, tmp_path / "a")
    base = load_base_pipeline(tiny_pipeline_dir).unet.get_submodule(name).weight.detach()
    spec = {"args": {"rank": 4, "lora_scale": 0.5}}
    fused = LoRA.load_pipeline(tmp_path / "a", tiny_pipeline_dir, spec, torch.device("cpu")).unet.get_submodule(name)
    torch.testing.assert_close(fused.weight.detach(), base + 0.5 * update, atol=1e-6, rtol=1e-5)


def test_snr_is_signal_over_noise_as_diffusers_computes_it():
    """Min-SNR weights need SNR = ᾱ/(1 − ᾱ); its inverse would weight the noisiest timesteps up, not down."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from conceptbench.methods.lora import snr

    hand = snr(torch.tensor([0.5, 0.8, 0.2]), torch.tensor([0, 1, 2]))
    torch.testing.assert_close(hand, torch.tensor([1.0, 4.0, 0.25]))
    scheduler = DDPMScheduler(**{k: v for k, v in SD15_SCHEDULE.items() if k != "set_alpha_to_one"})
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(snr(scheduler.alphas_cumprod, t), compute_snr(scheduler, t))


def test_weighted_mse_weights_each_samples_mean_error():
    """Each sample's mean squared error times its weight, then the batch mean: a weighting that is dropped
    or applied after the mean leaves Min-SNR training plain MSE."""
    pred, target = torch.zeros(2, 1, 2, 2), torch.tensor([1.0, 2.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2)
    assert weighted_mse(pred, target).item() == pytest.approx(2.5)  # errors² 1 and 4
    assert weighted_mse(pred, target, torch.tensor([1.0, 0.25])).item() == pytest.approx(1.0)  # (1 + 1) / 2


def test_the_lora_loss_is_min_snr_weighted_when_snr_gamma_is_set(tiny_pipeline_dir, caption_dir):
    """args.snr_gamma weights each sample's error by min(SNR, γ)/SNR; a loss that dropped the weights would
    train the Min-SNR variant as plain MSE."""
    spec = {"seed": 0, "resolution": 64, "train": {"steps": 1, "learning_rate": 1e-4, "batch_size": 4},
            "args": {"rank": 4, "snr_gamma": 1.0}}
    method = LoRA(spec["args"])
    method.setup(TrainContext(spec=spec, base_model=tiny_pipeline_dir, data_dir=caption_dir, class_dir=None,
                              device=torch.device("cpu"), mixed_precision="no"))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        batch = method.batch(0, g)
        batch["timesteps"] = torch.tensor([5, 100, 600, 990])  # SNR from far above γ = 1 to far below
        pred = method.unet(batch["noisy"], batch["timesteps"], batch["cond"]).sample
        per_sample = ((pred - batch["target"]) ** 2).mean(dim=(1, 2, 3))
        a = method.noise_scheduler.alphas_cumprod[batch["timesteps"]]
        weights = torch.clamp(a / (1 - a), max=1.0) / (a / (1 - a))
        loss = method.loss(batch, g)
    assert weights.min() < 0.01 and weights.max() == 1.0
    torch.testing.assert_close(loss, (per_sample * weights).mean())
    assert not torch.allclose(loss, per_sample.mean(), rtol=1e-2)
