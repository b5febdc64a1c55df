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
    assert batch["prompt_index"].tolist() == [0, 1, 2, 3] and batch["n_instance"] == 2
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
