"""One row per experiment x variant: metric means over non-degenerate images, cost and speed.

Torch-free, and read-only on its inputs: it never changes a per-variant result.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .io import atomic_path, read_json

METRICS = ["clip_t", "clip_i", "dino_i", "aesthetic"]
COLUMNS = [
    "experiment", "method", "variant", "param", "value", "n_images", "n_degenerate",
    *METRICS, "latency_ms", "trainable_params", "artifact_bytes", "train_seconds", "peak_mem_bytes",
]


def variant_keys(experiments: dict) -> list[tuple[str, str]]:
    """(experiment, variant) pairs in the order the workflow lists their files."""
    return [(e, v) for e, info in experiments.items() for v in info["variants"]]


def summarize_variant(per_image: pd.DataFrame, metrics: list[str]) -> dict:
    """Means of the metrics that apply, over images that are not degenerate."""
    degenerate = per_image["degenerate"].astype(bool)
    kept = per_image[~degenerate]
    row = {"n_images": int(len(per_image)), "n_degenerate": int(degenerate.sum())}
    for m in METRICS:
        row[m] = float(kept[m].mean()) if m in metrics and m in kept and len(kept) else float("nan")
    return row


def aggregate(experiments: dict, metrics_files, train_files, sample_dirs, csv_path, md_path) -> pd.DataFrame:
    keys = variant_keys(experiments)
    if not len(keys) == len(metrics_files) == len(train_files) == len(sample_dirs):
        raise ValueError("aggregate: one metrics, train and samples input per variant expected")
    rows = []
    for (exp, variant), m_file, t_file, s_dir in zip(keys, metrics_files, train_files, sample_dirs):
        info = experiments[exp]
        train = read_json(t_file)
        latency = read_json(Path(s_dir) / "latency.json")
        rows.append({
            "experiment": exp,
            "method": info["method"],
            "variant": variant,
            "param": info["param"],
            "value": info["variants"][variant],
            **summarize_variant(pd.read_csv(m_file), info["metrics"]),
            "latency_ms": latency["median_ms"],
            "trainable_params": train["trainable_params"],
            "artifact_bytes": train["artifact_bytes"],
            "train_seconds": train["train_seconds"],
            "peak_mem_bytes": train["peak_mem_bytes"],
        })
    table = pd.DataFrame(rows, columns=COLUMNS)
    with atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(md_path) as tmp:
        tmp.write_text(to_markdown(table), encoding="utf-8")
    return table


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if pd.isna(value) else f"{value:.4g}"
    return str(value)


def to_markdown(table: pd.DataFrame) -> str:
    """A plain GitHub-flavoured table (no tabulate dependency)."""
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"
