"""The workflow through `--profile profiles/slurm` on a real one-node SLURM cluster (tests/slurm/start.sh).

Runs where CB_SLURM_TESTS=1 (.ci/run sets it; start.sh needs root and installs Debian's SLURM if missing).
To keep CI short it runs a reduced copy of the embedded default: the DreamBooth experiment with two λ.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(os.environ.get("CB_SLURM_TESTS") != "1",
                       reason="set CB_SLURM_TESTS=1 to start a local SLURM cluster (root; see tests/slurm/start.sh)"),
]

ROOT = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((ROOT / "config/tiny.yaml").read_text())


def reduced_tiny() -> dict:
    cfg = copy.deepcopy(TINY)
    cfg["experiments"] = {"dreambooth": cfg["experiments"]["dreambooth"]}
    cfg["experiments"]["dreambooth"]["sweep"]["values"] = [0.25, 1.0]
    cfg["evaluation"]["seeds"] = 1
    cfg["cluster"] = {"gpu_model": "h100"}  # the GRES type start.sh gives the node
    return cfg


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A running cluster; its daemons are stopped afterwards whatever happened, and checked gone."""
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "CB_SLURM_DIR": str(state), "HF_HUB_OFFLINE": "1"}
    try:
        started = subprocess.run([ROOT / "tests/slurm/start.sh"], env=env, capture_output=True, text=True, timeout=900)
        assert started.returncode == 0, f"tests/slurm/start.sh failed:\n{started.stderr[-4000:]}"
        env["SLURM_CONF"] = str(state / "etc/slurm.conf")
        yield env
    finally:
        daemons = [line.split() for line in (state / "pids").read_text().splitlines()] if (state / "pids").exists() else []
        subprocess.run([ROOT / "tests/slurm/stop.sh"], env=env, timeout=120)
        left = [(name, pid) for name, pid in daemons if name != "link" and Path(f"/proc/{pid}").exists()
                and Path(f"/proc/{pid}/comm").read_text().strip() == name]
        assert not left, f"stop.sh left daemons running: {left}"
        assert not Path("/etc/slurm/slurm.conf").is_symlink(), "stop.sh left /etc/slurm/slurm.conf"


def snakemake_slurm(env, workdir, config, *args):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "workflow/Snakefile"), "-d", str(workdir),
           "--configfile", str(config), "--profile", str(ROOT / "profiles/slurm"),
           "--slurm-init-seconds-before-status-checks", "2", *args]
    try:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as e:
        # SIGTERM would wait for running jobs; Snakemake is stopped with SIGINT (subprocess kills it).
        raise AssertionError(f"snakemake did not finish in 900 s:\n{(e.stderr or b'')[-4000:]}") from None


def slurm_jobs(env) -> list[dict]:
    """Every job the cluster ran: id, Snakemake's comment (rule or group), state and allocated TRES."""
    out = subprocess.run(["sacct", "-X", "-n", "-P", "--format=JobID,Comment,State,AllocTRES"], env=env,
                         capture_output=True, text=True, check=True).stdout
    return [dict(zip(("id", "comment", "state", "tres"), line.split("|"))) for line in out.splitlines() if line]


def write_config(path, cfg):
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def slurm_run(cluster, tmp_path_factory):
    work = tmp_path_factory.mktemp("slurm-run")
    config = write_config(work / "tiny.yaml", reduced_tiny())
    proc = snakemake_slurm(cluster, work, config)
    assert proc.returncode == 0, f"the slurm run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return work, config, proc


def test_tiny_default_runs_end_to_end_through_slurm(cluster, slurm_run):
    work, _, proc = slurm_run
    summary = pd.read_csv(work / "results/tables/summary.csv")
    trained = summary[summary["variant"].str.startswith("lambda-")]  # beside the real-image reference rows
    assert sorted(trained["variant"]) == ["lambda-0.25", "lambda-1.0"]
    assert trained["clip_t"].notna().all()
    jobs = slurm_jobs(cluster)
    assert jobs and all(j["state"] == "COMPLETED" for j in jobs), jobs
    rule_jobs = int(re.search(r"^total\s+(\d+)$", proc.stdout + proc.stderr, re.M).group(1)) - 1  # not `all`
    # Grouping merges each chain into one job; the toy world's independent installs stay jobs of their own.
    assert len(jobs) < rule_jobs, f"{len(jobs)} SLURM jobs for {rule_jobs} rule jobs: grouping is off"
    variant = [j for j in jobs if j["comment"].startswith("rule_variant_")]
    assert len(variant) == 3 and all("gres/gpu=1" in j["tres"] for j in variant), jobs  # two λ and the base
    summary_jobs = [j for j in jobs if j["comment"].startswith("rule_summary_")]
    assert len(summary_jobs) == 1 and "gres/gpu" not in summary_jobs[0]["tres"], jobs


def test_changing_one_lambda_reruns_only_its_chain_through_slurm(cluster, slurm_run, tmp_path):
    work, _, _ = slurm_run
    kept = work / "results/train/dreambooth/lambda-1.0/train.json"
    before_mtime, before_ids = kept.stat().st_mtime_ns, {j["id"] for j in slurm_jobs(cluster)}
    cfg = reduced_tiny()
    cfg["experiments"]["dreambooth"]["sweep"]["values"][0] = 0.3
    proc = snakemake_slurm(cluster, work, write_config(tmp_path / "changed.yaml", cfg))
    assert proc.returncode == 0, f"the rerun failed:\n{proc.stderr[-6000:]}"
    new = [j for j in slurm_jobs(cluster) if j["id"] not in before_ids]
    # the variant's chain, the summary with its plots, and the experiment's base-vs-best figure
    assert sorted(j["comment"].split("_")[1] for j in new) == ["plot", "summary", "variant"], new
    assert kept.stat().st_mtime_ns == before_mtime
    summary = pd.read_csv(work / "results/tables/summary.csv")
    assert sorted(v for v in summary["variant"] if v.startswith("lambda-")) == ["lambda-0.3", "lambda-1.0"]


def test_a_bad_argument_stops_before_any_slurm_job(cluster, slurm_run, tmp_path):
    """A required method argument missing: the config check (the method's declaration) stops the run
    on the submit host, naming the key, and nothing is submitted."""
    work, _, _ = slurm_run
    before = {j["id"] for j in slurm_jobs(cluster)}
    cfg = reduced_tiny()
    del cfg["experiments"]["dreambooth"]["args"]["instance_prompt"]
    cfg["experiments"]["dreambooth"]["sweep"]["values"] = [1.0]
    proc = snakemake_slurm(cluster, work, write_config(tmp_path / "broken.yaml", cfg), "--retries", "0")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "instance_prompt" in out
    assert {j["id"] for j in slurm_jobs(cluster)} == before
