"""Seaborn figures of the study: each sweep's metrics against its hyperparameter. Torch-free."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from .aggregate import METRICS  # noqa: E402
from .io import atomic_path  # noqa: E402

LABELS = {"clip_t": "CLIP-T", "clip_i": "CLIP-I", "dino_i": "DINO-I", "aesthetic": "aesthetic"}


def plot_sweep(experiment: str, info: dict, metrics_files, out_path) -> None:
    """One panel per metric: per-variant means over non-degenerate images, 95 % bootstrap intervals."""
    frames = []
    for variant, path in zip(info["variants"], metrics_files):
        df = pd.read_csv(path)
        df = df[~df["degenerate"].astype(bool)]
        frames.append(df.assign(value=str(info["variants"][variant])))
    data = pd.concat(frames, ignore_index=True)
    metrics = [m for m in METRICS if m in info["metrics"]]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        sns.pointplot(data=data, x="value", y=metric, errorbar=("ci", 95), seed=0, ax=ax, linestyles="-")
        ax.set(xlabel=info["param"].split(".")[-1], ylabel=LABELS[metric], title=LABELS[metric])
    fig.suptitle(f"{experiment} ({info['method']})")
    fig.tight_layout()
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
