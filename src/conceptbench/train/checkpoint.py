"""Resumable training state in a work directory that outlives failed Snakemake jobs.

One file, `checkpoint.pt`, holds the latest state: the trainable tensors (in param-group order),
optimizer, LR scheduler, grad scaler, the method's extra state, the step reached and the training
seconds spent. It is written atomically and read with `torch.load(weights_only=True)`. A fingerprint
of the spec guards against resuming a run whose configuration has since changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from ..io import atomic_path

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"


def spec_fingerprint(spec: dict) -> str:
    """A stable hash of the resolved spec (JSON with sorted keys)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def save_checkpoint(work_dir: Path, state: dict) -> Path:
    """Write `state` to work_dir/checkpoint.pt atomically (the previous one stays until replaced)."""
    path = Path(work_dir) / CHECKPOINT
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(work_dir: Path, fingerprint: str) -> dict | None:
    """The saved state if there is one for this very spec; None (and a warning) for a stale one."""
    path = Path(work_dir) / CHECKPOINT
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("fingerprint") != fingerprint:
        log.warning("%s was written for another spec (fingerprint %s, now %s): starting afresh",
                    path, state.get("fingerprint"), fingerprint)
        return None
    return state


def remove_checkpoint(work_dir: Path) -> None:
    (Path(work_dir) / CHECKPOINT).unlink(missing_ok=True)
