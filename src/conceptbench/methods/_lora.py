"""LoRA pieces shared by the LoRA and DDPO methods: add an adapter, save it, load and fuse several.

The adapter is peft's, on the U-Net attention projections; it is saved with diffusers'
`save_lora_weights` (pytorch_lora_weights.safetensors) and read back with `load_lora_weights`, so any
stock diffusers pipeline can use the artifact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def add_lora(unet, rank: int, alpha: float | None = None, target_modules: Iterable[str] = DEFAULT_TARGETS,
             init: str | bool = "gaussian") -> list[torch.nn.Parameter]:
    """Freeze `unet`, add a LoRA adapter ("default") and return its parameters, cast to fp32.

    lora_B starts at zero (peft's default), so the adapted U-Net starts as the base one. The adapter
    stays fp32 even when the frozen base is held in fp16/bf16: autocast then runs the matmuls in low
    precision while the optimizer and GradScaler see fp32 tensors (no "unscale FP16 gradients").
    """
    from peft import LoraConfig

    from ..train.method import MethodError

    if int(rank) < 1:
        raise MethodError(f"lora: rank must be at least 1, got {rank}")
    targets = tuple(target_modules)
    layers = {name: m for name, m in unet.named_modules()
              if isinstance(m, torch.nn.Linear) and any(name.endswith(f".{t}") for t in targets)}
    if not layers:
        raise MethodError(f"lora: no Linear layer of the U-Net matches target_modules {list(targets)}")
    name, smallest = min(layers.items(), key=lambda item: min(item[1].in_features, item[1].out_features))
    if int(rank) > min(smallest.in_features, smallest.out_features):
        raise MethodError(f"lora: rank {rank} is larger than layer {name} ({smallest.in_features} in, "
                          f"{smallest.out_features} out); a rank above min(in, out) adds nothing")
    unet.requires_grad_(False)
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha if alpha is not None else rank),
                        init_lora_weights=init, target_modules=list(targets))
    unet.add_adapter(config)
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The adapter's tensors under diffusers' key names (what save_lora_weights expects)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().float().cpu().contiguous()
            for k, v in convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)).items()}


def save_lora(unet, out_dir: Path) -> Path:
    """Write the U-Net's adapter with StableDiffusionPipeline.save_lora_weights (safetensors + metadata)."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(
        str(out_dir), unet_lora_layers=lora_state_dict(unet), safe_serialization=True,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
    )
    return Path(out_dir) / WEIGHT_NAME


def fuse_loras(pipe, loras: list[tuple[Path, float]]):
    """Load each (LoRA folder, weight), combine them with their weights and fuse them into the U-Net.

    After fusing, the adapter layers are unloaded: the U-Net is a plain one whose weights are
    W + sum_i weight_i * scale_i * B_i A_i, so sampling costs what the base model costs.
    """
    if not loras:
        return pipe
    names = [f"lora{i}" for i in range(len(loras))]
    for name, (path, _) in zip(names, loras):
        if not (Path(path) / WEIGHT_NAME).exists():
            raise FileNotFoundError(f"{path}: no {WEIGHT_NAME} (is it a LoRA artifact?)")
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters(names, adapter_weights=[float(w) for _, w in loras])
    pipe.fuse_lora(components=["unet"], adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()
    return pipe
