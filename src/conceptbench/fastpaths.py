"""Sampling fast paths: the switches that make a loaded pipeline cheaper without changing what it draws.

`apply_fast_paths(pipe, cfg)` is called once on a ready pipeline (weights already in `cfg["dtype"]`,
LoRA already fused by the method's loader). Every switch keeps the output equal to the plain path
up to float rounding (tests/test_fastpaths.py states the tolerances):

- attention: "sdpa" (torch's scaled_dot_product_attention, diffusers' default under torch 2),
  "sdpa_fused" (also one fused QKV / KV projection per layer), or "classic" (the explicit
  softmax(QK^T)V). Custom processors (Custom Diffusion's) are left in place; fusing is then skipped.
- channels_last: U-Net and VAE in NHWC memory layout (faster convolutions on GPUs in fp16/bf16).
- tf32: TF32 matmuls and convolutions on CUDA (no effect on the CPU).
- compile: torch.compile of the U-Net (mode `compile_mode`); the first call pays the compile time.
- upcast_vae: with fp16 weights, run the VAE in fp32 (SD v1.5's VAE overflows in fp16).
- fuse_lora: fuse any LoRA adapter still attached to the U-Net into its weights.
- fold_custom_diffusion: copy Custom Diffusion's trained projections into their attention layers and
  put the stock processor back, so a Custom Diffusion U-Net has the same shape as every other method's
  (and its self-attention layers can take fused QKV projections too).
"""

from __future__ import annotations

import logging

import torch

from .config import defaults

log = logging.getLogger(__name__)

FAST_PATH_KEYS = ("attention", "channels_last", "tf32", "compile", "compile_mode", "upcast_vae", "fuse_lora",
                  "fold_custom_diffusion")
FAST_PATH_DEFAULTS = {k: v for k, v in defaults("sampling").items() if k in FAST_PATH_KEYS}  # the config schema's
ATTENTION = ("classic", "sdpa", "sdpa_fused")


def fast_path_config(cfg: dict | None) -> dict:
    """The fast-path keys of a sampling config, defaults filled in; a bad attention name is an error."""
    out = {k: (cfg or {}).get(k, v) for k, v in FAST_PATH_DEFAULTS.items()}
    if out["attention"] not in ATTENTION:
        raise ValueError(f"sampling.attention must be one of {list(ATTENTION)}, got {out['attention']!r}")
    return out


def set_attention(unet, kind: str) -> str:
    """Put `kind` processors on every attention layer that has a stock one; returns what was applied."""
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    stock = (AttnProcessor, AttnProcessor2_0)
    layers = [m for m in unet.modules() if isinstance(m, Attention)]
    custom = [m for m in layers if not isinstance(m.processor, stock)]
    if kind == "sdpa_fused" and not custom:
        unet.fuse_qkv_projections()
        return "sdpa_fused"
    if kind == "sdpa_fused":
        log.warning("attention: %d layers carry custom processors (%s); using sdpa without fused projections",
                    len(custom), type(custom[0].processor).__name__)
        kind = "sdpa"
    for m in layers:
        if isinstance(m.processor, stock):
            m.set_processor(AttnProcessor() if kind == "classic" else AttnProcessor2_0())
    return kind


def fuse_attached_lora(pipe) -> bool:
    """Fuse LoRA layers still attached to the U-Net (peft) into its weights; True if there were any."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not any(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules()):
        return False
    pipe.fuse_lora(components=["unet"])
    pipe.unload_lora_weights()
    return True


def fold_custom_diffusion(unet) -> int:
    """Fold Custom Diffusion processors into their attention layers; returns how many were folded.

    The processor computes cross-attention with its own k/v (and, for crossattn, q/out) projections in
    place of the layer's, and detaches the first token's key and value, which steers gradients only.
    Copying its weights into to_k/to_v (to_q/to_out) and restoring the stock SDPA processor computes the
    same attention. A layer whose k/v projections carry a bias (the processor's have none) is left as it is.
    """
    from diffusers.models.attention_processor import (Attention, AttnProcessor2_0, CustomDiffusionAttnProcessor,
                                                      CustomDiffusionAttnProcessor2_0)

    folded = 0
    for attn in unet.modules():
        proc = getattr(attn, "processor", None)
        if not (isinstance(attn, Attention) and isinstance(proc, (CustomDiffusionAttnProcessor,
                                                                   CustomDiffusionAttnProcessor2_0))):
            continue
        if proc.train_kv and (attn.to_k.bias is not None or attn.to_v.bias is not None):
            continue
        with torch.no_grad():
            if proc.train_kv:
                attn.to_k.weight.copy_(proc.to_k_custom_diffusion.weight)
                attn.to_v.weight.copy_(proc.to_v_custom_diffusion.weight)
            if proc.train_q_out:
                attn.to_q.weight.copy_(proc.to_q_custom_diffusion.weight)
                attn.to_out[0].load_state_dict(proc.to_out_custom_diffusion[0].state_dict())
        attn.set_processor(AttnProcessor2_0())
        folded += 1
    return folded


def upcast_vae(vae) -> None:
    """Hold the VAE in fp32 and cast the latents it decodes to fp32 (the pipeline hands it fp16 ones)."""
    vae.to(torch.float32)
    target = vae.post_quant_conv if vae.post_quant_conv is not None else vae.decoder

    def to_fp32(module, args):
        return (args[0].to(torch.float32), *args[1:])

    target.register_forward_pre_hook(to_fp32)


def apply_fast_paths(pipe, cfg: dict | None = None) -> dict:
    """Apply the sampling fast paths of `cfg` to `pipe` in place; returns the settings in effect."""
    cfg = fast_path_config(cfg)
    applied = dict(cfg, lora_fused=False, custom_diffusion_folded=0,
                   vae_dtype=str(pipe.vae.dtype).removeprefix("torch."))
    if cfg["fuse_lora"]:
        applied["lora_fused"] = fuse_attached_lora(pipe)
    if cfg["fold_custom_diffusion"]:
        applied["custom_diffusion_folded"] = fold_custom_diffusion(pipe.unet)
    applied["attention"] = set_attention(pipe.unet, cfg["attention"])
    if cfg["upcast_vae"] and pipe.vae.dtype == torch.float16:
        upcast_vae(pipe.vae)
        applied["vae_dtype"] = "float32"
    if cfg["channels_last"]:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if pipe.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bool(cfg["tf32"])
        torch.backends.cudnn.allow_tf32 = bool(cfg["tf32"])
    if cfg["compile"]:
        pipe.unet = torch.compile(pipe.unet, mode=cfg["compile_mode"], fullgraph=False)
    log.info("fast paths: %s", applied)
    return applied
