"""Each sampling fast path draws what the plain path draws, within a stated tolerance, on the tiny pipeline.

Tolerances (max |Δ| of images in [0, 1], 2 DDIM steps with CFG): fp32 paths 1e-4 (float rounding of a
different kernel or layout); bf16 weights 0.1 and fp16 weights with the fp32 VAE 0.02 (8- and 11-bit mantissas).
"""

import copy

import numpy as np
import pytest
import torch

from conceptbench.fastpaths import FAST_PATH_DEFAULTS, apply_fast_paths, fast_path_config

PLAIN = dict(attention="classic", channels_last=False, tf32=False, compile=False, fuse_lora=False,
             fold_custom_diffusion=False)
FP32_TOL = 1e-4


@pytest.fixture(scope="module")
def base_pipe():
    from conceptbench.models.tiny import build_tiny_pipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these models are too small to gain from threads; a shared CPU loses by them
    pipe = build_tiny_pipeline(None, seed=0)
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    torch.set_num_threads(threads)


def draw(pipe) -> np.ndarray:
    return pipe("a photo of a dog", generator=torch.Generator().manual_seed(0), num_inference_steps=2,
                guidance_scale=7.5, height=64, width=64, output_type="np").images


def with_paths(pipe, dtype=torch.float32, **cfg):
    pipe = copy.deepcopy(pipe).to(dtype=dtype)
    applied = apply_fast_paths(pipe, {**PLAIN, **cfg})
    return pipe, applied


@pytest.fixture(scope="module")
def plain(base_pipe):
    pipe, applied = with_paths(base_pipe)
    assert applied["attention"] == "classic"
    return draw(pipe)


@pytest.mark.parametrize("cfg", [dict(attention="sdpa"), dict(attention="sdpa_fused"), dict(channels_last=True),
                                 dict(attention="sdpa_fused", channels_last=True)], ids=str)
def test_fp32_fast_paths_match_the_plain_path(base_pipe, plain, cfg):
    from diffusers.models.attention_processor import AttnProcessor2_0, FusedAttnProcessor2_0

    pipe, applied = with_paths(base_pipe, **cfg)
    want = {"sdpa": AttnProcessor2_0, "sdpa_fused": FusedAttnProcessor2_0}.get(cfg.get("attention"))
    if want:
        assert {type(p) for p in pipe.unet.attn_processors.values()} == {want}
    if cfg.get("channels_last"):
        conv = pipe.unet.conv_in.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    np.testing.assert_allclose(draw(pipe), plain, atol=FP32_TOL, rtol=0)


@pytest.mark.parametrize("dtype,tol,vae", [(torch.bfloat16, 0.1, torch.bfloat16), (torch.float16, 0.02, torch.float32)],
                         ids=["bf16", "fp16-fp32vae"])
def test_low_precision_weights_match_within_a_looser_tolerance(base_pipe, plain, dtype, tol, vae):
    pipe, applied = with_paths(base_pipe, dtype=dtype, attention="sdpa", upcast_vae=True)
    assert pipe.unet.dtype == dtype and pipe.vae.dtype == vae
    got = draw(pipe)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, plain, atol=tol, rtol=0)
    assert np.abs(got - plain).max() > 0  # the weights really were cast


def test_lora_still_attached_is_fused_and_gives_the_same_images(base_pipe):
    from peft.tuners.tuners_utils import BaseTunerLayer

    from conceptbench.methods._lora import add_lora

    pipe = copy.deepcopy(base_pipe)
    add_lora(pipe.unet, rank=4)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # a trained-looking adapter: unfused it changes the output
    with_adapter = draw(pipe)
    assert np.abs(with_adapter - draw(base_pipe)).max() > 1e-3
    applied = apply_fast_paths(pipe, {**PLAIN, "fuse_lora": True, "attention": "sdpa"})
    assert applied["lora_fused"]
    assert not any(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules())
    np.testing.assert_allclose(draw(pipe), with_adapter, atol=FP32_TOL, rtol=0)


def test_custom_diffusion_processors_survive_every_attention_setting(base_pipe):
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0

    from conceptbench.methods.custom_diffusion import cross_attention_processors

    pipe = copy.deepcopy(base_pipe)
    procs = cross_attention_processors(pipe.unet, train_q_out=False)
    pipe.unet.set_attn_processor({**pipe.unet.attn_processors, **procs})
    before = draw(pipe)
    for kind in ("sdpa_fused", "classic"):
        applied = apply_fast_paths(pipe, {**PLAIN, "attention": kind})
        assert applied["attention"] == ("sdpa" if kind == "sdpa_fused" else "classic")
        kept = [n for n, p in pipe.unet.attn_processors.items() if isinstance(p, CustomDiffusionAttnProcessor2_0)]
        assert sorted(kept) == sorted(procs)
        np.testing.assert_allclose(draw(pipe), before, atol=FP32_TOL, rtol=0)


@pytest.mark.parametrize("train_q_out", [False, True], ids=["crossattn_kv", "crossattn"])
def test_folded_custom_diffusion_draws_the_same_and_takes_fused_projections(base_pipe, train_q_out):
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    from conceptbench.methods.custom_diffusion import cross_attention_processors

    pipe = copy.deepcopy(base_pipe)
    procs = cross_attention_processors(pipe.unet, train_q_out=train_q_out)
    torch.manual_seed(2)
    with torch.no_grad():
        for proc in procs.values():  # trained-looking projections: the processors now differ from the layers
            for p in proc.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    pipe.unet.set_attn_processor({**pipe.unet.attn_processors, **procs})
    with_processors = draw(pipe)
    assert np.abs(with_processors - draw(base_pipe)).max() > 1e-3
    applied = apply_fast_paths(pipe, {**PLAIN, "fold_custom_diffusion": True, "attention": "sdpa_fused"})
    assert applied["custom_diffusion_folded"] == len(procs) and applied["attention"] == "sdpa_fused"
    assert {type(p) for p in pipe.unet.attn_processors.values()} == {FusedAttnProcessor2_0}
    np.testing.assert_allclose(draw(pipe), with_processors, atol=FP32_TOL, rtol=0)


def test_tf32_touches_no_global_on_the_cpu(base_pipe):
    before = torch.backends.cuda.matmul.allow_tf32
    apply_fast_paths(copy.deepcopy(base_pipe), {**PLAIN, "tf32": not before})
    assert torch.backends.cuda.matmul.allow_tf32 == before


def test_compile_wraps_the_unet_without_running_it(base_pipe):
    pipe = copy.deepcopy(base_pipe)
    apply_fast_paths(pipe, {**PLAIN, "compile": True})
    assert isinstance(pipe.unet, torch._dynamo.eval_frame.OptimizedModule)


def test_compiled_unet_matches_the_plain_path(base_pipe, plain):
    # inductor compiles the tiny U-Net to C++ on the CPU: about 45 s on the idle 2-core VM, once per test run
    pipe = copy.deepcopy(base_pipe)
    apply_fast_paths(pipe, {**PLAIN, "compile": True})
    np.testing.assert_allclose(draw(pipe), plain, atol=FP32_TOL, rtol=0)


def test_config_defaults_and_errors():
    assert fast_path_config({}) == FAST_PATH_DEFAULTS
    with pytest.raises(ValueError, match="sampling.attention"):
        fast_path_config({"attention": "flash"})
