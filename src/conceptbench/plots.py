"""Seaborn figures of the study, from summary.csv and the per-image scores. Torch-free.

- plot_sweep: each metric of one experiment against its swept value, 95 % intervals, the study's
  published points and the real-image upper bound;
- plot_efficiency: fidelity against artifact size or latency across methods (the study's
  fidelity-efficiency spectrum);
- plot_gallery: one variant's samples, prompts by seeds, like the study's galleries.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from PIL import Image  # noqa: E402

from . import study as study_numbers  # noqa: E402
from .aggregate import METRICS, REAL_IMAGES  # noqa: E402
from .io import atomic_path  # noqa: E402

LABELS = {"clip_t": "CLIP-T", "clip_i": "CLIP-I", "dino_i": "DINO-I", "aesthetic": "aesthetic",
          "artifact_bytes": "artifact size (bytes, log)", "latency_ms": "latency per image (ms, log)"}


def _save(fig, out_path) -> None:
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _errors(rows: pd.DataFrame, metric: str) -> np.ndarray:
    """[2, N] distances from the mean to the interval ends, for matplotlib's yerr."""
    mean = rows[metric].to_numpy(float)
    return np.abs(np.stack([mean - rows[f"{metric}_lo"].to_numpy(float), rows[f"{metric}_hi"].to_numpy(float) - mean]))


def plot_sweep(experiment: str, info: dict, summary_csv, out_path, study_path=None) -> None:
    """One panel per metric: means over non-degenerate images with 95 % bootstrap intervals."""
    summary = pd.read_csv(summary_csv)
    rows = summary[(summary["experiment"] == experiment) & (summary["method"] != REAL_IMAGES)]
    rows = rows.set_index("variant").loc[list(info["variants"])].reset_index()
    if rows.empty:
        raise ValueError(f"{summary_csv}: no rows for experiment {experiment!r}")
    users = summary["experiment"].astype(str).str.split("+")
    real = summary[(summary["method"] == REAL_IMAGES) & users.apply(lambda names: experiment in names)]
    study = study_numbers.load(study_path) if study_path else None
    x = np.arange(len(rows))
    metrics = [m for m in METRICS if m in info["metrics"]]
    sns.set_theme(style="whitegrid")
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.4 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        ok = rows[metric].notna().to_numpy()
        ax.errorbar(x[ok], rows[metric][ok], yerr=_errors(rows[ok], metric), fmt="o-", capsize=4, label="measured")
        if study:
            published = [study_numbers.published(study, experiment, info["method"], v).get(metric) for v in info["variants"].values()]
            have = [i for i, p in enumerate(published) if p is not None]
            if have:
                ax.plot(x[have], [published[i] for i in have], "x", color="C3", markersize=8, label="study")
        if metric in real and real[metric].notna().any():
            ax.axhline(real[metric].iloc[0], color="C2", linestyle="--", label="real images (LOO)")
        ax.set_xticks(x, [str(v) for v in info["variants"].values()])
        ax.set(xlabel=info["param"].split(".")[-1], ylabel=LABELS[metric], title=LABELS[metric])
        ax.legend(fontsize=7)
    fig.suptitle(f"{experiment} ({info['method']})")
    fig.tight_layout()
    _save(fig, out_path)


def plot_efficiency(summary_csv, out_path, x: str) -> None:
    """Fidelity against cost (x: artifact_bytes or latency_ms) across methods, one panel per metric."""
    summary = pd.read_csv(summary_csv)
    rows = summary[summary["method"] != REAL_IMAGES]
    metrics = [m for m in METRICS if rows[m].notna().any()]
    if not metrics or rows.empty:
        raise ValueError(f"{summary_csv}: no scored variants to plot")
    sns.set_theme(style="whitegrid")
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.6), squeeze=False)
    methods = list(dict.fromkeys(rows["method"]))
    palette = dict(zip(methods, sns.color_palette(n_colors=len(methods))))
    for ax, metric in zip(axes[0], metrics):
        data = rows[rows[metric].notna() & rows[x].notna() & (rows[x] > 0)]
        for method, group in data.groupby("method", sort=False):
            ax.errorbar(group[x], group[metric], yerr=_errors(group, metric), fmt="none", ecolor=palette[method], alpha=0.6)
        sns.scatterplot(data=data, x=x, y=metric, hue="method", style="method", palette=palette, s=60, ax=ax)
        for _, r in data.iterrows():
            ax.annotate(str(r["value"]), (r[x], r[metric]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set(xlabel=LABELS[x], ylabel=LABELS[metric], title=LABELS[metric])
        ax.legend(fontsize=7)
    fig.suptitle(f"fidelity vs {LABELS[x].split(' (')[0]}, across methods")
    fig.tight_layout()
    _save(fig, out_path)


def plot_gallery(title: str, samples_dir, metrics_csv, out_path, max_seeds: int = 4) -> None:
    """Prompts down, seeds across; each tile says its seed and CLIP-T, degenerate ones framed red."""
    scores = pd.read_csv(metrics_csv)
    if scores.empty:
        raise ValueError(f"{metrics_csv}: no samples")
    prompts = list(dict.fromkeys(scores.sort_values("prompt_index")["prompt"]))
    seeds = sorted(scores["seed"].unique())[:max_seeds]
    fig, axes = plt.subplots(len(prompts), len(seeds), figsize=(1.9 * len(seeds) + 1.6, 2.0 * len(prompts)), squeeze=False)
    for i, prompt in enumerate(prompts):
        for j, seed in enumerate(seeds):
            ax = axes[i][j]
            ax.set_xticks([]), ax.set_yticks([])
            hit = scores[(scores["prompt"] == prompt) & (scores["seed"] == seed)]
            if hit.empty:
                ax.set_axis_off()
                continue
            row = hit.iloc[0]
            with Image.open(Path(samples_dir) / row["file"]) as im:
                ax.imshow(im.convert("RGB"))
            ax.set_title(f"seed {seed}" + ("" if pd.isna(row["clip_t"]) else f" · CLIP-T {row['clip_t']:.2f}"), fontsize=7)
            if bool(row["degenerate"]):
                for side in ax.spines.values():
                    side.set(color="red", linewidth=3)
            if j == 0:
                ax.set_ylabel("\n".join(textwrap.wrap(prompt, 22)), fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, out_path)
