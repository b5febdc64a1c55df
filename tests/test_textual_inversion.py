"""Textual Inversion: only the new rows train, the saved embedding loads back, the loss falls."""

from __future__ import annotations

import pytest
import torch

from conceptbench.methods import get_method
from conceptbench.methods.textual_inversion import TextualInversion
from conceptbench.train import MethodError, TrainContext, train, train_config

SPEC = {
    "experiment": "textual_inversion", "variant": "vectors-2", "method": "textual_inversion", "seed": 0,
    "resolution": 64,
    "train": {"steps": 2, "learning_rate": 5e-2, "checkpoint_every": 0, "log_every": 1},
    "args": {"placeholder_token": "<sks-cat>", "initializer_token": "cat", "instance_prompt": "a photo of <sks-cat>",
             "num_vectors": 2},
}


EMB = "embeddings.token_embedding.weight"


def make(base, data, **args):
    spec = {**SPEC, "args": {**SPEC["args"], **args}}
    ctx = TrainContext(spec=spec, base_model=base, data_dir=data, class_dir=None, device=torch.device("cpu"),
                       mixed_precision="no")
    return TextualInversion(spec["args"]), ctx, spec


def prompt_embeds(pipe, prompt="<sks-cat> on a table"):
    embeds, _ = pipe.encode_prompt(prompt, torch.device("cpu"), 1, False)
    return embeds


@pytest.mark.parametrize("num_vectors", [1, 4])
def test_only_the_new_rows_change(tiny_pipeline_dir, instance_dir, tmp_path, num_vectors):
    method, ctx, spec = make(tiny_pipeline_dir, instance_dir, num_vectors=num_vectors)
    method.setup(ctx)
    before = {k: v.clone() for k, v in method.text_encoder.state_dict().items()}
    unet = {k: v.clone() for k, v in method.unet.state_dict().items()}
    initial = method.tokens.vectors.detach().clone()
    method.setup = lambda ctx: None
    summary = train(method, ctx, train_config(spec), tmp_path / "work")
    method.pipeline()  # writes the trained rows into the embedding matrix

    dim = method.text_encoder.get_input_embeddings().weight.shape[1]
    assert summary["trainable_params"] == num_vectors * dim
    assert all(torch.equal(v, unet[k]) for k, v in method.unet.state_dict().items())
    after = method.text_encoder.state_dict()
    assert [k for k, v in after.items() if not torch.equal(v, before[k])] == [EMB]
    rows = (after[EMB] != before[EMB]).any(1)
    assert rows.nonzero().flatten().tolist() == method.tokens.ids  # weight decay moved no frozen row
    assert not torch.equal(method.tokens.vectors.detach(), initial)
    assert len(method.tokenizer) == 49408 + num_vectors


def test_saved_embedding_loads_to_the_same_text_embeddings(tiny_pipeline_dir, instance_dir, tmp_path):
    method, ctx, spec = make(tiny_pipeline_dir, instance_dir)
    train(method, ctx, train_config(spec), tmp_path / "work")
    method.save(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "learned_embeds.safetensors"))
    assert list(saved) == ["<sks-cat>"] and saved["<sks-cat>"].shape[0] == 2

    trained = prompt_embeds(method.pipeline())
    loaded = TextualInversion.load_pipeline(tmp_path, tiny_pipeline_dir, spec, torch.device("cpu"))
    assert loaded.maybe_convert_prompt("<sks-cat> here", loaded.tokenizer) == "<sks-cat> <sks-cat>_1 here"
    torch.testing.assert_close(prompt_embeds(loaded), trained, rtol=0, atol=1e-6)
    base = TextualInversion.load_pipeline(tmp_path, tiny_pipeline_dir, spec, torch.device("cpu"))
    base.text_encoder.get_input_embeddings().weight.data[-2:] += 1.0
    assert not torch.allclose(prompt_embeds(base), trained)  # the comparison sees the new rows


def test_loss_falls_when_overfitting_one_batch(tiny_pipeline_dir, instance_dir, overfit):
    # Only 8 x 32 numbers train and the tiny random U-Net listens little to its prompt, so the loss
    # falls by about 1.5 per cent; with no gradient reaching the vectors it would not move at all.
    method, ctx, _ = make(tiny_pipeline_dir, instance_dir, num_vectors=8)
    losses = overfit(method, ctx, torch.optim.Adam, lr=0.1, steps=30)
    assert losses[-1] < losses[0] - 0.01, losses
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 25, losses


def test_argument_errors(tiny_pipeline_dir, instance_dir):
    assert get_method("textual_inversion") is TextualInversion
    for args, message in [({"placeholder_token": "<SKS>", "instance_prompt": "a <SKS>"}, "lower-case"),
                          ({"initializer_token": "a photo"}, None),
                          ({"instance_prompt": "a photo"}, "lacks the placeholder"),
                          ({"placeholder_token": "cat", "instance_prompt": "a cat"}, "already exist")]:
        method, ctx, _ = make(tiny_pipeline_dir, instance_dir, **args)
        if message is None:
            method.setup(ctx)  # a multi-token initializer is averaged, not refused
        else:
            with pytest.raises(MethodError, match=message):
                method.setup(ctx)


def test_the_studys_textual_inversion_scales_its_rate_and_clips_nothing(tiny_pipeline_dir, instance_dir, tmp_path,
                                                                        monkeypatch):
    """config/config.yaml's Textual Inversion as the README command runs it: 5e-4 x accumulation 4 x batch 1
    = 2e-3, four micro-batches a step, no gradient clipping."""
    from pathlib import Path

    from conceptbench import config as cb
    from conceptbench.io import read_jsonl

    study = cb.resolve_variant(cb.load(Path(__file__).resolve().parents[1] / "config/config.yaml"),
                               "textual_inversion", "vectors-1")
    method, ctx, spec = make(tiny_pipeline_dir, instance_dir)
    spec["train"] = {**study["train"], "steps": 1, "checkpoint_every": 0, "log_every": 1}
    clipped, batches = [], []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: clipped.append(a))
    real = TextualInversion.batch
    monkeypatch.setattr(TextualInversion, "batch", lambda self, *a: batches.append(a) or real(self, *a))
    train(method, ctx, train_config(spec), tmp_path / "work")
    assert read_jsonl(tmp_path / "work" / "loss_log.jsonl")[0]["lr"] == pytest.approx(2e-3)
    assert clipped == [] and len(batches) == 4


def test_the_vectors_start_at_the_initializer_words_embedding(tiny_pipeline_dir, instance_dir):
    """Every vector starts at the initializer's embedding, the mean of its tokens' rows when it splits into
    several ("a photo"), not at the random rows the resized matrix gets: base_prompt's untrained baseline
    and the method's starting point both rest on it."""
    for word, pieces in (("cat", 1), ("a photo", 2)):
        method, ctx, _ = make(tiny_pipeline_dir, instance_dir, initializer_token=word, num_vectors=3)
        method.setup(ctx)
        ids = method.tokenizer.encode(word, add_special_tokens=False)
        rows = method.text_encoder.get_input_embeddings().weight.detach()
        assert len(ids) == pieces
        expected = rows[ids].mean(0).expand(3, -1)
        torch.testing.assert_close(method.tokens.vectors.detach(), expected)
        torch.testing.assert_close(rows[method.tokens.ids], expected)  # the matrix holds them too


@pytest.mark.parametrize("num_vectors", [1, 4])
def test_every_vector_of_the_placeholder_gets_a_gradient(tiny_pipeline_dir, instance_dir, num_vectors):
    """The loss reaches each of the N vectors. A prompt that spells the placeholder as one token, or a
    lookup that leaves one of its tokens to the frozen matrix row, trains fewer vectors than the variant
    claims (vectors-1 would train nothing; weight decay alone still moves it)."""
    method, ctx, _ = make(tiny_pipeline_dir, instance_dir, num_vectors=num_vectors)
    method.setup(ctx)
    g = torch.Generator().manual_seed(0)
    method.loss(method.batch(0, g), g).backward()
    grad = method.tokens.vectors.grad
    assert grad is not None and (grad.abs().sum(1) > 0).all(), grad


def test_loss_is_the_noise_prediction_error_under_the_expanded_prompt(tiny_pipeline_dir, instance_dir):
    """The loss is the U-Net's error at predicting the drawn noise (an epsilon model) given the training
    prompt with the placeholder spelled as its N tokens, as the loaded pipeline spells it when sampling."""
    import torch.nn.functional as F

    method, ctx, _ = make(tiny_pipeline_dir, instance_dir)
    method.setup(ctx)
    g = torch.Generator().manual_seed(0)
    batch = method.batch(0, g)
    h = torch.Generator().manual_seed(0)  # replay the draws: the latents, then the noise
    noise = torch.randn(method.instance.draw(1, h).shape, generator=h)
    ids = method.tokenizer(["a photo of <sks-cat> <sks-cat>_1"], padding="max_length", max_length=77,
                           return_tensors="pt").input_ids
    with torch.no_grad():
        loss = method.loss(batch, g)
        pred = method.unet(batch["noisy"], batch["timesteps"], method.text_encoder(ids)[0]).sample
    torch.testing.assert_close(loss, F.mse_loss(pred, noise))
