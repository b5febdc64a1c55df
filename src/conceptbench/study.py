"""The study's published numbers (data/study_results.yaml, package data): read, checked, looked up. Torch-free."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

# Package data: the workflow reads it from the installed package as from a checkout.
RESULTS_FILE = resources.files("conceptbench") / "data" / "study_results.yaml"
# The columns of summary.csv the study reports numbers for.
COMPARED = ["clip_t", "clip_i", "dino_i", "aesthetic", "latency_ms", "trainable_params", "artifact_bytes"]


def load(path) -> dict:
    """The study file, checked: a source, metric bands, and rows that name only known columns."""
    path = Path(path)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    for key in ("source", "metrics", "variants"):
        if key not in (data or {}):
            raise ValueError(f"{path}: missing key {key!r}")
    for n, row in enumerate(data["variants"], 1):
        unknown = set(row) - {"experiment", "method", "value", *COMPARED}
        if unknown or not {"experiment", "method", "value"} <= set(row):
            raise ValueError(f"{path}: variants[{n}] needs experiment, method and value; unknown keys {sorted(unknown)}")
    for method, sizes in (data.get("methods") or {}).items():
        if set(sizes) - set(COMPARED):
            raise ValueError(f"{path}: methods.{method} has unknown keys {sorted(set(sizes) - set(COMPARED))}")
    return data


def same_value(a, b) -> bool:
    """Swept values compared as the config writes them: 1 == 1.0, 'true' == True, 'l2' == 'l2'."""
    if isinstance(a, bool) or isinstance(b, bool):
        return str(a).lower() == str(b).lower()
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)


def published(study: dict, experiment: str, method: str, value) -> dict:
    """The study's numbers for one variant: its own row over its method's approximate sizes; nothing
    for an experiment the study did not run (such as a multi-concept one of a studied method)."""
    rows = [r for r in study["variants"] if r["experiment"] == experiment and r["method"] == method]
    if not rows:
        return {}
    numbers = dict((study.get("methods") or {}).get(method, {}))
    for row in rows:
        if same_value(row["value"], value):
            numbers.update({k: v for k, v in row.items() if k in COMPARED})
    return numbers


def band_text(study: dict, metric: str) -> str:
    """'below 0.75 poor, 0.75-0.85 good, ...' for a metric, or '' where the study gives none."""
    parts = []
    for lo, hi, word in study["metrics"].get(metric, {}).get("bands", []):
        parts.append(f"below {hi:.2f} {word}" if lo is None else f"{lo:.2f}-{hi:.2f} {word}")
    return ", ".join(parts)
