"""Device, dtype, thread and memory helpers shared by training and sampling.

Everything device-specific sits here so the training loop and the sampler read the same on a
CPU laptop and on an H100: pick the device once, ask here how to autocast, sync or measure memory.
"""

from __future__ import annotations

import contextlib
import resource
import sys

import torch

PRECISIONS = {"no": None, "fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_device(name: str | None = None) -> torch.device:
    """`name` if given (e.g. "cpu", "cuda:1"), else CUDA when available, else the CPU."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_threads(threads: int | None = None) -> int:
    """Limit torch's intra-op threads to Snakemake's `threads` (None leaves torch's choice); returns the count."""
    if threads:
        torch.set_num_threads(max(1, int(threads)))
    return torch.get_num_threads()


def precision_dtype(name: str) -> torch.dtype | None:
    """The low-precision dtype a mixed-precision name stands for; None for full fp32."""
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; expected one of {sorted(PRECISIONS)}")
    return PRECISIONS[name]


def torch_dtype(name: str) -> torch.dtype:
    """The dtype to hold weights in for a precision name ("fp32"/"no" -> float32)."""
    return precision_dtype(name) or torch.float32


def autocast(device: torch.device, mixed_precision: str):
    """An autocast context for `mixed_precision` ("no" gives a no-op context)."""
    dtype = precision_dtype(mixed_precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, mixed_precision: str) -> torch.amp.GradScaler:
    """A GradScaler, enabled only for fp16 (bf16 and fp32 need no loss scaling)."""
    return torch.amp.GradScaler(device.type, enabled=mixed_precision == "fp16")


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for queued CUDA work (no-op on the CPU), so wall-clock timings mean something."""
    device = torch.device(device) if device is not None else pick_device()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, source): CUDA's max allocated memory, or the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "torch.cuda.max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "ru_maxrss"
