"""Per-image scores, their means with bootstrap intervals, and paired deltas against the base. Torch-free.

Every variant and baseline of an experiment is sampled with the same (prompt, seed) pairs, so a
variant's change over the untrained base is measured pair by pair: delta = mean over the pairs both
scored (non-degenerate in both) of variant − base, with a 95 % percentile bootstrap interval that
resamples pairs (the paired bootstrap). An interval above zero says this training run moved that
metric up on these prompts and seeds, more than the spread over the samples explains; the spread over
training runs at other seeds is replicates.py's.

Metrics are discovered, not listed: every numeric column of a metrics CSV (metrics/evaluate.py) that
is not a sample key is one. Rows of the main prompt set give the metric its own name; rows of another
set (the "prior" probe: the class prompt) give "<set>_<metric>", e.g. prior_clip_i, so a per-image
column added to evaluate (an oracle's accuracy, say) reaches summary.csv with no change here.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .metrics.scores import bootstrap_ci

STUDY_METRICS = ["clip_t", "clip_i", "dino_i", "aesthetic"]  # summarised only where an experiment lists them
SAMPLE_COLUMNS = {"file", "prompt", "eval_prompt", "prompt_index", "seed", "prompt_set", "degenerate"}
PAIR = ["prompt_index", "seed"]
MAIN_SET = "eval"
N_BOOT = 1000

# The metric a task is judged on, in order of preference: the first one with a paired delta picks an
# experiment's best variant for the "Does it learn?" table. The toy world's ground truth (oracle_*,
# world/oracle.py) comes first where it exists; the study's metrics otherwise. LCM is judged by the
# share of what the prompt names that the image shows (a teacher cut to 4 DDIM steps loses some of it,
# which part depends on the base model); DDPO by its reward, the learned aesthetic: what it optimises
# (its gap to the true one is aesthetic_excess).
TARGETS = {"subject": ["oracle_subject", "dino_i", "clip_i"], "style": ["oracle_ninja", "clip_t"],
           "acceleration": ["oracle_prompt", "clip_t"], "reward": ["aesthetic"]}


def mean_with_interval(values, seed: int = 0) -> tuple[float, float, float]:
    """(mean, 95 % lo, 95 % hi) of the finite values; all NaN when there are none."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return math.nan, math.nan, math.nan
    lo, hi = bootstrap_ci(values, n_boot=N_BOOT, seed=seed)
    return float(values.mean()), lo, hi


def metric_columns(per_image: pd.DataFrame) -> list[str]:
    """The per-image metrics of a metrics CSV: its numeric columns that are not sample keys."""
    return [c for c in per_image.columns
            if c not in SAMPLE_COLUMNS and pd.api.types.is_numeric_dtype(per_image[c])]


def variant_scores(per_image: pd.DataFrame, metrics: list[str]) -> dict[str, pd.Series]:
    """{summary name: per-image values of non-degenerate images, indexed by (prompt_index, seed)}.

    The study's four metrics count only where the experiment lists them (`metrics`); any other metric
    column counts wherever it has values. Rows without a prompt_set belong to the main set.
    """
    sets = per_image["prompt_set"] if "prompt_set" in per_image else pd.Series(MAIN_SET, index=per_image.index)
    kept = per_image[~per_image["degenerate"].astype(bool)]
    out = {}
    for column in metric_columns(per_image):
        if column in STUDY_METRICS and column not in metrics:
            continue
        for prompt_set in dict.fromkeys(sets):  # main set first in the shipped samples
            rows = kept[sets[kept.index] == prompt_set]
            values = rows.set_index(PAIR)[column].astype(float).dropna()
            if len(values):
                out[column if prompt_set == MAIN_SET else f"{prompt_set}_{column}"] = values
    return out


def counts(per_image: pd.DataFrame) -> dict:
    """Images and degenerate images of the main prompt set."""
    main = per_image[per_image["prompt_set"] == MAIN_SET] if "prompt_set" in per_image else per_image
    return {"n_images": int(len(main)), "n_degenerate": int(main["degenerate"].astype(bool).sum())}


def all_image_means(per_image: pd.DataFrame, metrics: list[str]) -> dict:
    """<metric>_all for each of the study's metrics: the mean over every image of the main prompt set,
    degenerate ones (black, flat) included, as the study averaged (its rank-16 LoRA mean includes black
    images); NaN where the experiment does not list the metric. The other means leave them out."""
    main = per_image[per_image["prompt_set"] == MAIN_SET] if "prompt_set" in per_image else per_image
    out = {}
    for metric in STUDY_METRICS:
        values = main[metric].astype(float) if metric in metrics and metric in main else pd.Series(dtype=float)
        values = values[np.isfinite(values)]
        out[f"{metric}_all"] = float(values.mean()) if len(values) else math.nan
    return out


def summarize(scores: dict[str, pd.Series], names: list[str], seed: int = 0) -> dict:
    """name, name_lo, name_hi for each of `names` (NaN where the variant has no values)."""
    row = {}
    for name in names:
        mean, lo, hi = mean_with_interval(scores[name] if name in scores else [], seed)
        row.update({name: mean, f"{name}_lo": lo, f"{name}_hi": hi})
    return row


def differences(values: pd.Series, reference: pd.Series) -> np.ndarray:
    """values − reference on each (prompt, seed) pair both have."""
    both = pd.concat([values.rename("v"), reference.rename("r")], axis=1, join="inner").dropna()
    return (both["v"] - both["r"]).to_numpy()


def paired_delta(values: pd.Series, reference: pd.Series, seed: int = 0) -> tuple[float, float, float, int]:
    """(mean of values − reference over the pairs both have, 95 % lo, 95 % hi, number of pairs)."""
    diff = differences(values, reference)
    mean, lo, hi = mean_with_interval(diff, seed)
    return mean, lo, hi, len(diff)


def paired_deltas(scores: dict[str, pd.Series], reference: dict[str, pd.Series], names: list[str],
                  seed: int = 0) -> dict:
    """name_delta, name_delta_lo, name_delta_hi for each of `names`, against `reference`'s scores."""
    row = {}
    for name in names:
        d = paired_delta(scores[name], reference[name], seed)[:3] if name in scores and name in reference else (math.nan,) * 3
        row.update(dict(zip((f"{name}_delta", f"{name}_delta_lo", f"{name}_delta_hi"), d)))
    return row


def best_variant(rows: pd.DataFrame, task: str) -> tuple[str, str] | tuple[None, None]:
    """(variant, metric): among trained rows of one experiment, the one whose paired delta on the task's
    first target metric that has one lies highest: the largest lower end of its 95 % interval (not the
    largest delta, whose wide interval may cover zero while another variant's lies above it); ties go
    to the larger delta. (None, None) when no row has that delta."""
    for metric in TARGETS.get(task, []):
        column = f"{metric}_delta"
        if column in rows and rows[column].notna().any():
            ranked = rows[rows[column].notna()].sort_values([f"{column}_lo", column], ascending=False, kind="stable")
            return str(ranked["variant"].iloc[0]), metric
    return None, None
