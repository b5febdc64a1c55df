"""The workflow as a user runs it: lint, the study's dry-run DAG, and the embedded default end to end."""

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((ROOT / "config/tiny.yaml").read_text())


def snakemake(workdir, *args, check=True):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(workdir), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry-run, as {rule: count}."""
    counts, in_table = {}, False
    for line in output.splitlines():
        if line.startswith("Job stats"):
            in_table = True
        elif in_table:
            m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
            if m and m.group(1) != "total":
                counts[m.group(1)] = int(m.group(2))
            elif line.strip().startswith("total"):
                break
    return counts


def write_config(path, cfg):
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_lint_is_clean(tmp_path):
    proc = snakemake(tmp_path, "--lint", "--configfile", str(ROOT / "config/tiny.yaml"))
    out = proc.stdout + proc.stderr
    assert "Congratulations, your workflow is in a good condition" in out


def test_study_dry_run_lists_the_whole_study(tmp_path):
    proc = snakemake(tmp_path, "-n", "--configfile", str(ROOT / "config/config.yaml"))
    counts = job_counts(proc.stdout)
    variants = 4 + 3 + 4 + 2 + 2 + 2  # DreamBooth λ, LoRA rank, TI vectors, CD params, LCM loss, DDPO lora
    assert counts == {
        "fetch_model": 5,  # sd15, sd14, clip, dino, aesthetic
        "fetch_dataset": 5,  # dog (3 images), dog5, cat_toy, naruto, cc12m
        "prepare_dataset": 5,
        "generate_class_images": 1,  # once, shared by every λ
        "embed_references": 3,  # the three subjects scored with CLIP-I/DINO-I
        "train": variants,
        "sample": variants,
        "evaluate": variants,
        "aggregate": 1,
        "plot_sweep": 6,
        "all": 1,
    }
    for name in ("lambda-0.25", "rank-16", "vectors-8", "params-crossattn_kv", "loss-huber", "lora-true"):
        assert f"/{name}/artifact" in proc.stdout


def test_bad_config_stops_before_any_job(tmp_path):
    cfg = copy.deepcopy(TINY)
    cfg["experiments"]["dreambooth"]["train"]["steps"] = -1
    proc = snakemake(tmp_path, "-n", "--configfile", str(write_config(tmp_path / "bad.yaml", cfg)), check=False)
    assert proc.returncode != 0
    assert "experiments.dreambooth.train.steps: -1 is less than the minimum of 1" in proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The embedded default, run once end to end as `make demo` runs it."""
    work = tmp_path_factory.mktemp("tiny")
    config = write_config(work / "tiny.yaml", copy.deepcopy(TINY))
    snakemake(work, "--cores", "2", "--configfile", str(config))
    snakemake(work, "--configfile", str(config), "--report", str(work / "report.html"))
    return work, config


def test_tiny_run_scores_every_lambda(tiny_run):
    work, _ = tiny_run
    summary = pd.read_csv(work / "results/tables/summary.csv")
    assert sorted(summary["variant"]) == ["lambda-0.25", "lambda-0.5", "lambda-0.75", "lambda-1.0"]
    for col in ("clip_t", "clip_i", "dino_i", "latency_ms", "trainable_params", "artifact_bytes"):
        assert summary[col].notna().all() and (summary[col].abs() < float("inf")).all(), col
    assert (summary["n_images"] == 3 * TINY["evaluation"]["seeds"]).all()
    assert (work / "results/plots/dreambooth.png").stat().st_size > 0
    n_class = TINY["experiments"]["dreambooth"]["class_images"]["count"]
    assert len(list((work / "results/class_images/dreambooth").glob("*.png"))) == n_class


def test_report_holds_the_table_and_samples(tiny_run):
    work, _ = tiny_run
    html = (work / "report.html").read_text(errors="replace")
    assert "summary.csv" in html and "dreambooth.png" in html and "00_0.png" in html


def test_nothing_reruns_when_nothing_changed(tiny_run):
    work, config = tiny_run
    proc = snakemake(work, "-n", "--configfile", str(config))
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_changing_one_lambda_reruns_only_its_chain(tiny_run, tmp_path):
    work, _ = tiny_run
    cfg = copy.deepcopy(TINY)
    cfg["experiments"]["dreambooth"]["sweep"]["values"][0] = 0.3
    proc = snakemake(work, "-n", "--configfile", str(write_config(tmp_path / "changed.yaml", cfg)))
    assert job_counts(proc.stdout) == {"train": 1, "sample": 1, "evaluate": 1, "aggregate": 1, "plot_sweep": 1, "all": 1}
    assert "lambda-0.3/artifact" in proc.stdout


def test_changing_sampling_reruns_no_training(tiny_run, tmp_path):
    work, _ = tiny_run
    cfg = copy.deepcopy(TINY)
    cfg["evaluation"]["seeds"] += 1
    proc = snakemake(work, "-n", "--configfile", str(write_config(tmp_path / "changed.yaml", cfg)))
    counts = job_counts(proc.stdout)
    assert "train" not in counts and counts["sample"] == 4 and counts["evaluate"] == 4
