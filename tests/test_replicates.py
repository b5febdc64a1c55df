"""Deltas pooled over replicate runs (conceptbench.replicates): the two-stage bootstrap and the folders it reads."""

import numpy as np
import pandas as pd
import pytest

from conceptbench.metrics.scores import bootstrap_ci
from conceptbench.replicates import best_by_target, main, pool, two_stage_interval


def test_one_run_gives_the_paired_bootstrap_interval():
    values = np.random.default_rng(1).normal(0.3, 1.0, 200)
    mean, lo, hi = two_stage_interval([values], n_boot=4000)
    ref_lo, ref_hi = bootstrap_ci(values, n_boot=4000, seed=7)
    assert mean == pytest.approx(values.mean())
    assert lo == pytest.approx(ref_lo, abs=0.012) and hi == pytest.approx(ref_hi, abs=0.012)


def test_a_variant_that_learnt_in_one_run_of_four_is_not_above_zero():
    """Within each run the differences agree exactly, so a bootstrap of pairs alone would put the interval
    near 0.25; resampling the runs first, a replicate of four zero-runs is common (p = 0.32), one with
    three or more copies of the learning run has p = 0.05 and four p = 0.004: the interval is [0, 0.75]."""
    runs = [np.ones(24), np.zeros(24), np.zeros(24), np.zeros(24)]
    mean, lo, hi = two_stage_interval(runs, n_boot=4000)
    assert (mean, lo, hi) == (0.25, 0.0, 0.75)
    assert bootstrap_ci(np.concatenate(runs), n_boot=4000)[0] > 0.15


def test_unequal_runs_weigh_by_their_pairs():
    mean, lo, hi = two_stage_interval([np.ones(30), np.zeros(10)], n_boot=2000)
    assert mean == 0.75
    assert lo == 0.0 and hi == 1.0  # two copies of either run are drawn a quarter of the time each


def test_it_refuses_empty_and_non_finite_runs():
    with pytest.raises(ValueError, match="at least one"):
        two_stage_interval([np.ones(3), np.array([])])
    with pytest.raises(ValueError, match="NaN"):
        two_stage_interval([np.array([1.0, np.nan])])


def write_run(folder, shift, lo, degenerate_pair=None):
    """A finished run's folder: experiment x with a base and a variant v scored on m over 3 prompts x 4 seeds,
    v = base + shift on every pair; its deltas.csv says the run's own interval starts at `lo`."""
    pairs = [(p, s) for p in range(3) for s in range(4)]
    base = pd.DataFrame({"file": [f"{p}_{s}.png" for p, s in pairs], "prompt_index": [p for p, _ in pairs],
                         "seed": [s for _, s in pairs], "prompt_set": "eval", "degenerate": False,
                         "m": np.linspace(0.0, 1.0, len(pairs))})
    variant = base.assign(m=base["m"] + shift)
    if degenerate_pair is not None:
        variant.loc[degenerate_pair, ["degenerate", "m"]] = [True, 100.0]
    (folder / "metrics/x").mkdir(parents=True)
    base.to_csv(folder / "metrics/x/base.csv", index=False)
    variant.to_csv(folder / "metrics/x/v.csv", index=False)
    (folder / "tables").mkdir()
    pd.DataFrame([dict(experiment="x", method="dreambooth", variant="v", role="trained", reference="base", metric="m",
                       n_pairs=12, delta=shift, delta_lo=lo, delta_hi=shift + 0.1)]).to_csv(folder / "tables/deltas.csv", index=False)
    return folder


def test_pool_reads_each_runs_pairs_and_counts_its_own_verdicts(tmp_path):
    a = write_run(tmp_path / "a", shift=1.0, lo=0.9, degenerate_pair=0)
    b = write_run(tmp_path / "b", shift=0.0, lo=-0.1)
    row = pool([a, b], n_boot=500).set_index("metric").loc["m"]
    assert row["n_pairs"] == 23  # the degenerate image's pair is left out
    assert row["delta"] == pytest.approx(11 / 23)
    assert row["delta_lo"] == 0.0 and row["delta_hi"] == pytest.approx(1.0)
    assert (row["runs"], row["runs_above_zero"], row["run_delta_min"], row["run_delta_max"]) == (2, 1, 0.0, pytest.approx(1.0))
    best = best_by_target(pool([a, b], n_boot=500), metrics=["m"])
    assert best[["experiment", "variant"]].values.tolist() == [["x", "v"]]


def test_pool_names_what_is_wrong_with_its_folders(tmp_path):
    a = write_run(tmp_path / "a", shift=1.0, lo=0.9)
    with pytest.raises(ValueError, match="twice"):
        pool([a, tmp_path / "a"])
    with pytest.raises(FileNotFoundError, match="nothing/tables/deltas.csv"):
        pool([a, tmp_path / "nothing"])
    b = write_run(tmp_path / "b", shift=0.0, lo=-0.1)
    (b / "metrics/x/v.csv").unlink()
    with pytest.raises(FileNotFoundError, match="b/metrics/x/v.csv"):
        pool([a, b])
    c = write_run(tmp_path / "c", shift=0.0, lo=-0.1)
    pd.read_csv(c / "tables/deltas.csv").assign(metric="other").to_csv(c / "tables/deltas.csv", index=False)
    with pytest.raises(ValueError, match="c/tables/deltas.csv lacks 1"):
        pool([a, c])


def test_the_command_prints_the_best_variants_and_writes_every_delta(tmp_path, capsys):
    a = write_run(tmp_path / "a", shift=1.0, lo=0.9)
    b = write_run(tmp_path / "b", shift=0.5, lo=0.4)
    assert main([str(a), str(b), "--out", str(tmp_path / "out/pooled.csv"), "--metrics", "m"]) == 0
    printed = capsys.readouterr().out
    assert "| x | m | v | +0.750 [+0.500, +1.000] | 2 of 2 | +0.500 to +1.000 |" in printed
    assert pd.read_csv(tmp_path / "out/pooled.csv")["delta"].tolist() == [pytest.approx(0.75)]
    assert main([str(a), str(tmp_path / "missing")]) == 2
    assert "missing/tables/deltas.csv" in capsys.readouterr().err
