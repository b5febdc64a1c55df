"""Aggregation reads per-variant results and never changes them."""

import hashlib
import json
from pathlib import Path

import pandas as pd

from conceptbench.aggregate import aggregate


def _digest(paths):
    return {str(p): (hashlib.sha256(Path(p).read_bytes()).hexdigest(), Path(p).stat().st_mtime_ns) for p in paths}


def test_aggregate_leaves_its_inputs_untouched(tmp_path):
    experiments = {"dreambooth": {"method": "dreambooth", "task": "subject", "metrics": ["clip_t", "clip_i", "dino_i"],
                                  "param": "args.prior_loss_weight", "variants": {"lambda-0.25": 0.25, "lambda-1.0": 1.0}}}
    metrics, trains, samples = [], [], []
    for i, variant in enumerate(experiments["dreambooth"]["variants"]):
        m = tmp_path / f"{variant}.csv"
        pd.DataFrame({"file": ["00_0.png", "00_1.png"], "prompt": ["sks dog", "sks dog"], "eval_prompt": ["a dog"] * 2,
                      "prompt_index": [0, 0], "seed": [0, 1], "clip_t": [0.2 + i, 0.3], "clip_i": [0.5, 0.6],
                      "dino_i": [0.4, 0.5], "aesthetic": [None, None], "degenerate": [False, True]}).to_csv(m, index=False)
        t = tmp_path / f"{variant}.json"
        t.write_text(json.dumps({"trainable_params": 10, "artifact_bytes": 100, "train_seconds": 1.5, "peak_mem_bytes": 7}))
        s = tmp_path / f"samples-{variant}"
        s.mkdir()
        (s / "latency.json").write_text(json.dumps({"median_ms": 12.5}))
        metrics.append(m), trains.append(t), samples.append(s)
    inputs = [*metrics, *trains, *(s / "latency.json" for s in samples)]
    before = _digest(inputs)
    table = aggregate(experiments, metrics, trains, samples, tmp_path / "summary.csv", tmp_path / "summary.md")
    assert _digest(inputs) == before
    assert list(table["n_degenerate"]) == [1, 1]  # and the degenerate image is out of the mean
    assert abs(table.loc[0, "clip_t"] - 0.2) < 1e-9
