"""A spec's training settings (its `train` section) with the config schema's defaults filled in.

Torch-free; the defaults are the schema's (config.defaults("train")), so the loop has no table of its own.
"""

from __future__ import annotations

from ..config import ConfigError, defaults
from ..registry import closest

TRAIN_REQUIRED = ("steps", "learning_rate")  # a run says how long and how fast, even outside the workflow


def train_config(spec: dict) -> dict:
    """spec["train"] with defaults filled in; unknown keys and missing required ones are errors."""
    given, known = dict(spec.get("train", {})), defaults("train")
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ConfigError(f"unknown train settings {unknown}{closest(unknown[0], known)} (known: {sorted(known)})")
    missing = [k for k in TRAIN_REQUIRED if k not in given]
    if missing:
        raise ConfigError(f"train settings lack {missing}")
    return {**known, **given}
