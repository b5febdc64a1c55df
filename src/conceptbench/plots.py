"""Seaborn figures of the study, from summary.csv and the per-image scores. Torch-free.

- plot_sweep: each metric of one experiment against its swept value, 95 % intervals, the study's
  published points, the real-image upper bound and the untrained baselines as reference bands; DDPO's
  training reward over epochs;
- plot_efficiency: fidelity against artifact size or latency across methods (the study's
  fidelity-efficiency spectrum);
- plot_gallery: one variant's samples, prompts by seeds, like the study's galleries;
- plot_learning: the base and the best variant side by side on the same seeds ("Does it learn?").
"""

from __future__ import annotations

import json
import math
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
from .aggregate import BASE, BASELINE, METRICS, REAL_IMAGES, TRAINED  # noqa: E402
from .io import atomic_path, read_jsonl  # noqa: E402
from .paired import best_variant  # noqa: E402

LABELS = {"clip_t": "CLIP-T", "clip_i": "CLIP-I", "dino_i": "DINO-I", "aesthetic": "aesthetic",
          "prior_clip_t": "class prompt: CLIP-T", "prior_clip_i": "class prompt: CLIP-I to subject",
          "prior_dino_i": "class prompt: DINO-I to subject", "prior_class_clip_i": "class prompt: CLIP-I to class images",
          "prior_class_dino_i": "class prompt: DINO-I to class images",
          "artifact_bytes": "artifact size (bytes, log)", "latency_ms": "latency per image (ms, log)"}


def _save(fig, out_path) -> None:
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _errors(rows: pd.DataFrame, metric: str) -> np.ndarray:
    """[2, N] distances from the mean to the interval ends, for matplotlib's yerr."""
    mean = rows[metric].to_numpy(float)
    return np.abs(np.stack([mean - rows[f"{metric}_lo"].to_numpy(float), rows[f"{metric}_hi"].to_numpy(float) - mean]))


def _extra_metrics(rows: pd.DataFrame) -> list[str]:
    """Metrics beyond the study's four that these rows have values of (prior drift, an oracle's scores)."""
    return [c[: -len("_delta")] for c in rows.columns
            if c.endswith("_delta") and c[: -len("_delta")] not in METRICS and rows[c[: -len("_delta")]].notna().any()]


def _reward_logs(artifacts) -> dict[str, list[dict]]:
    """{variant: [{epoch, mean, std}]} from the rewards.json a DDPO artifact holds (its training reward log)."""
    logs = {}
    for artifact in artifacts:
        path = Path(artifact) / "rewards.json"
        if path.exists():
            logs[Path(artifact).parent.name] = json.loads(path.read_text())["epochs"]
    return logs


def _baseline_bands(ax, baselines: pd.DataFrame, metric: str) -> None:
    """Each untrained baseline as a dotted line with its 95 % interval as a band."""
    for n, (_, b) in enumerate(baselines.iterrows()):
        if pd.isna(b[metric]):
            continue
        color = f"C{4 + n}"
        ax.axhline(b[metric], color=color, linestyle=":", label=f"{b['variant']} (untrained)")
        ax.axhspan(b[f"{metric}_lo"], b[f"{metric}_hi"], color=color, alpha=0.15)


def plot_sweep(experiment: str, info: dict, summary_csv, out_path, study_path=None, artifacts=()) -> None:
    """One panel per metric: means over non-degenerate images with 95 % bootstrap intervals, the
    baselines as bands; one more panel with the training reward per epoch where artifacts have one."""
    summary = pd.read_csv(summary_csv)
    mine = summary[summary["experiment"] == experiment]
    rows = mine[mine["role"] == TRAINED].set_index("variant").loc[list(info["variants"])].reset_index()
    if rows.empty:
        raise ValueError(f"{summary_csv}: no rows for experiment {experiment!r}")
    baselines = mine[mine["role"] == BASELINE]
    users = summary["experiment"].astype(str).str.split("+")
    real = summary[(summary["method"] == REAL_IMAGES) & users.apply(lambda names: experiment in names)]
    study = study_numbers.load(study_path) if study_path else None
    x = np.arange(len(rows))
    metrics = [m for m in METRICS if m in info["metrics"]] + _extra_metrics(rows)
    rewards = _reward_logs(artifacts)
    panels = len(metrics) + bool(rewards)
    ncols = min(4, panels)
    sns.set_theme(style="whitegrid")
    fig, axes = plt.subplots(math.ceil(panels / ncols), ncols, figsize=(3.6 * ncols, 3.3 * math.ceil(panels / ncols)),
                             squeeze=False)
    axes = axes.ravel()
    for ax, metric in zip(axes, metrics):
        ok = rows[metric].notna().to_numpy()
        ax.errorbar(x[ok], rows[metric][ok], yerr=_errors(rows[ok], metric), fmt="o-", capsize=4, label="measured")
        _baseline_bands(ax, baselines, metric)
        if study:
            published = [study_numbers.published(study, experiment, info["method"], v).get(metric) for v in info["variants"].values()]
            have = [i for i, p in enumerate(published) if p is not None]
            if have:
                ax.plot(x[have], [published[i] for i in have], "x", color="C3", markersize=8, label="study")
        if metric in real and real[metric].notna().any():
            ax.axhline(real[metric].iloc[0], color="C2", linestyle="--", label="real images (LOO)")
        ax.set_xticks(x, [str(v) for v in info["variants"].values()])
        ax.set(xlabel=info["param"].split(".")[-1], ylabel=LABELS.get(metric, metric), title=LABELS.get(metric, metric))
        ax.legend(fontsize=7)
    if rewards:
        ax = axes[len(metrics)]
        for variant, epochs in rewards.items():
            epoch = np.array([e["epoch"] for e in epochs])
            mean, std = np.array([e["mean"] for e in epochs]), np.array([e["std"] for e in epochs])
            ax.plot(epoch, mean, "o-", markersize=3, label=variant)
            ax.fill_between(epoch, mean - std, mean + std, alpha=0.2)
        ax.set(xlabel="epoch (epoch 0: before the first update)", ylabel="training reward, mean ± std",
               title="reward over training")
        ax.legend(fontsize=7)
    for ax in axes[panels:]:
        ax.set_axis_off()
    fig.suptitle(f"{experiment} ({info['method']}); dotted lines and bands: untrained baselines")
    fig.tight_layout()
    _save(fig, out_path)


def plot_efficiency(summary_csv, out_path, x: str) -> None:
    """Fidelity against cost (x: artifact_bytes or latency_ms) across methods, one panel per metric."""
    summary = pd.read_csv(summary_csv)
    rows = summary[summary["role"] == TRAINED]
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


def _samples_by_pair(samples_dir) -> dict[tuple[int, int], dict]:
    return {(r["prompt_index"], r["seed"]): r for r in read_jsonl(Path(samples_dir) / "samples.jsonl")}


def plot_learning(experiment: str, info: dict, summary_csv, sample_dirs, out_path, max_seeds: int = 4) -> None:
    """The untrained base and the best variant (largest paired delta on the task's target metric) on the
    same (prompt, seed) pairs: prompts down, the base's seeds then the variant's across."""
    summary = pd.read_csv(summary_csv)
    mine = summary[summary["experiment"] == experiment]
    trained = mine[mine["role"] == TRAINED]
    best, by = best_variant(trained, info.get("task", ""))
    best = best or str(trained["variant"].iloc[0])
    dirs = {Path(d).name: d for d in sample_dirs}
    if BASE not in dirs or best not in dirs:
        raise ValueError(f"plot_learning: samples of {BASE!r} and {best!r} needed, got {sorted(dirs)}")
    base, variant = _samples_by_pair(dirs[BASE]), _samples_by_pair(dirs[best])
    pairs = sorted(set(base) & set(variant))
    prompts = sorted({p for p, _ in pairs})
    seeds = sorted({s for _, s in pairs})[:max_seeds]
    cols = [(name, rows, dirs[name], seed) for name, rows in ((BASE, base), (best, variant)) for seed in seeds]
    fig, axes = plt.subplots(len(prompts), len(cols), figsize=(1.7 * len(cols) + 1.8, 1.9 * len(prompts)), squeeze=False)
    for i, prompt in enumerate(prompts):
        for j, (name, rows, folder, seed) in enumerate(cols):
            ax = axes[i][j]
            ax.set_xticks([]), ax.set_yticks([])
            row = rows.get((prompt, seed))
            if row is None:
                ax.set_axis_off()
                continue
            with Image.open(Path(folder) / row["file"]) as im:
                ax.imshow(im.convert("RGB"))
            if i == 0:
                ax.set_title(f"{name} · seed {seed}", fontsize=7)
            if j in (0, len(seeds)):
                ax.set_ylabel("\n".join(textwrap.wrap(row["prompt"], 22)), fontsize=6)
    row = trained.set_index("variant").loc[best]
    why = ""
    if by is not None:
        why = f"; Δ {LABELS.get(by, by)} {row[f'{by}_delta']:+.3f} [{row[f'{by}_delta_lo']:+.3f}, {row[f'{by}_delta_hi']:+.3f}]"
    fig.suptitle(f"{experiment}: untrained base (left) vs {best} (right), same seeds{why}", fontsize=8)
    fig.tight_layout()
    _save(fig, out_path)
