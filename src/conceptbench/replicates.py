"""Paired deltas pooled over replicate runs: one config run at several seeds, each into its own results folder.

A run's paired delta (paired.py) says how far a variant moved a metric over its base on that run's
(prompt, seed) pairs. Its interval resamples those pairs, so it cannot see how differently a second
training run at another seed would have come out: a variant that learnt at one seed and not at the
next has a narrow interval above zero in the first run. Pooled over replicate runs (the same config
with another top-level `seed`, which seeds training and the evaluation samples), the interval resamples
twice, runs and then pairs within each drawn run (a two-stage bootstrap), so it is as wide as the
run-to-run spread says.

    python -m conceptbench.replicates results-s0 results-s100 results-s200 [--out pooled.csv]

reads each folder's tables/deltas.csv (which deltas exist) and metrics/<experiment>/<variant>.csv (the
pairs), writes every pooled delta to --out and prints, for each experiment and target metric, the
variant whose pooled interval lies highest. Torch-free.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from .paired import N_BOOT, STUDY_METRICS, differences, variant_scores

KEY = ["experiment", "variant", "reference", "metric"]
COLUMNS = KEY + ["role", "runs", "n_pairs", "delta", "delta_lo", "delta_hi", "run_delta_min", "run_delta_max",
                 "runs_above_zero"]
# The learning targets of the toy world (tests/test_workflow.py's learning test, docs/toyworld.md).
TARGET_METRICS = ["oracle_subject", "clip_i", "dino_i", "oracle_ninja", "oracle_prompt", "aesthetic", "true_aesthetic"]


def two_stage_interval(runs: list[np.ndarray], n_boot: int = N_BOOT, alpha: float = 0.05,
                       seed: int = 0) -> tuple[float, float, float]:
    """(mean, lo, hi) of the pooled differences with a two-stage percentile bootstrap: each replicate draws
    len(runs) runs with replacement, then each drawn run's differences with replacement, and takes the mean
    of all it drew. The mean is over every difference of every run."""
    runs = [np.asarray(r, dtype=np.float64).ravel() for r in runs]
    if not runs or any(len(r) == 0 for r in runs):
        raise ValueError("two_stage_interval needs at least one run, each with at least one difference")
    if not all(np.isfinite(r).all() for r in runs):
        raise ValueError("two_stage_interval got NaN or infinite differences; drop them first")
    rng = np.random.default_rng(seed)
    k = len(runs)
    picks = rng.integers(0, k, size=(n_boot, k))
    # within[i][b, j]: the mean of run i's differences resampled for slot j of replicate b
    within = [r[rng.integers(0, len(r), size=(n_boot, k, len(r)))].mean(axis=2) for r in runs]
    sizes = np.array([len(r) for r in runs], dtype=np.float64)
    drawn = np.stack(within)[picks, np.arange(n_boot)[:, None], np.arange(k)[None, :]]
    means = (drawn * sizes[picks]).sum(axis=1) / sizes[picks].sum(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(np.concatenate(runs).mean()), float(lo), float(hi)


def _differences(folder: Path, experiment: str, variant: str, reference: str, metric: str,
                 cache: dict) -> np.ndarray:
    def scores(v):
        if (experiment, v) not in cache:
            path = folder / "metrics" / experiment / f"{v}.csv"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no per-image scores for {experiment}/{v}; is {folder} a finished run?")
            cache[experiment, v] = variant_scores(pd.read_csv(path), STUDY_METRICS)
        return cache[experiment, v]

    a, b = scores(variant).get(metric), scores(reference).get(metric)
    return np.array([]) if a is None or b is None else differences(a, b)


def read_deltas(folder: Path) -> pd.DataFrame:
    path = Path(folder) / "tables" / "deltas.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; pass results folders of finished runs (the workflow's `results:`)")
    return pd.read_csv(path)


def pool(folders: list[Path], n_boot: int = N_BOOT, seed: int = 0) -> pd.DataFrame:
    """One row per (experiment, variant, reference, metric) that every run has a paired delta for, pooled
    over the runs; runs_above_zero counts the runs whose own interval lies above zero."""
    folders = [Path(f) for f in folders]
    if len({f.resolve() for f in folders}) != len(folders):
        raise ValueError("replicates: a results folder is given twice; each replicate is a run of its own")
    tables = [read_deltas(f).set_index(KEY) for f in folders]
    keys = tables[0].index
    for folder, table in zip(folders[1:], tables[1:]):
        missing = keys.difference(table.index)
        if len(missing):
            raise ValueError(f"replicates: {folder / 'tables/deltas.csv'} lacks {len(missing)} delta(s) of "
                             f"{folders[0]}, e.g. {'/'.join(missing[0])}: runs of different configs?")
    caches = [{} for _ in folders]
    rows = []
    for key in keys:
        experiment, variant, reference, metric = key
        diffs = [_differences(f, experiment, variant, reference, metric, c) for f, c in zip(folders, caches)]
        if any(len(d) == 0 for d in diffs):
            continue
        mean, lo, hi = two_stage_interval(diffs, n_boot=n_boot, seed=seed)
        own = [t.loc[key] for t in tables]
        rows.append(dict(zip(KEY, key), role=own[0]["role"], runs=len(folders), n_pairs=int(sum(map(len, diffs))),
                         delta=mean, delta_lo=lo, delta_hi=hi,
                         run_delta_min=float(min(o["delta"] for o in own)),
                         run_delta_max=float(max(o["delta"] for o in own)),
                         runs_above_zero=int(sum(o["delta_lo"] > 0 for o in own))))
    return pd.DataFrame(rows, columns=COLUMNS)


def best_by_target(pooled: pd.DataFrame, metrics: list[str] = TARGET_METRICS) -> pd.DataFrame:
    """For each experiment and metric: the trained variant whose pooled interval against the base lies highest."""
    rows = pooled[(pooled["role"] == "trained") & (pooled["reference"] == "base") & pooled["metric"].isin(metrics)]
    rows = rows.sort_values(["delta_lo", "delta"], ascending=False, kind="stable")
    best = rows.drop_duplicates(["experiment", "metric"])
    order = {m: i for i, m in enumerate(metrics)}
    return best.sort_values(["experiment", "metric"], key=lambda c: c.map(order) if c.name == "metric" else c)


def _markdown(best: pd.DataFrame) -> str:
    lines = ["| experiment | metric | variant | pooled delta [95 %] | runs above zero | run deltas |", "|---|---|---|---|---|---|"]
    for r in best.itertuples():
        lines.append(f"| {r.experiment} | {r.metric} | {r.variant} | {r.delta:+.3f} [{r.delta_lo:+.3f}, {r.delta_hi:+.3f}]"
                     f"{'' if r.delta_lo > 0 else ' ✗'} | {r.runs_above_zero} of {r.runs} | "
                     f"{r.run_delta_min:+.3f} to {r.run_delta_max:+.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conceptbench.replicates", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="results folders of the same config at different seeds")
    parser.add_argument("--out", type=Path, help="write every pooled delta here (CSV)")
    parser.add_argument("--metrics", nargs="+", default=TARGET_METRICS,
                        help="metrics to print the best variant of (default: the toy world's learning targets)")
    parser.add_argument("--n-boot", type=int, default=N_BOOT)
    args = parser.parse_args(argv)
    try:
        pooled = pool(args.results, n_boot=args.n_boot)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        pooled.to_csv(args.out, index=False)
    print(_markdown(best_by_target(pooled, args.metrics)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
