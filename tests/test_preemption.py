"""Preemption: a training job that receives SIGTERM saves a checkpoint, exits non-zero, and the rerun resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch

from conceptbench.io import read_jsonl
from conceptbench.registry import build
from conceptbench.train import run_training
from conceptbench.train.checkpoint import CHECKPOINT

# Run one training job in its own process, as the workflow's train script does.
DRIVER = """
import json, sys
from conceptbench.jobs import job
with job(sys.argv[2]):
    from conceptbench.registry import build
    from conceptbench.train import run_training
    kwargs = json.loads(sys.argv[1])
    run_training(build(kwargs["spec"]), **kwargs, device="cpu", threads=1)
"""


def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes_from_it(tiny_pipeline_dir, instance_dir, class_dir,
                                                                   dreambooth_spec, tmp_path):
    spec = dreambooth_spec
    spec["train"].update(steps=40, checkpoint_every=0, log_every=1)  # no periodic checkpoint: only SIGTERM's
    kwargs = dict(spec=spec, base_model=str(tiny_pipeline_dir), data_dir=str(instance_dir), class_dir=str(class_dir),
                  artifact_dir=str(tmp_path / "artifact"), work_dir=str(tmp_path / "work"),
                  log_path=str(tmp_path / "loss.jsonl"), summary_path=str(tmp_path / "train.json"))
    job_log = tmp_path / "job.log"
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(kwargs), str(job_log)],
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, stderr=subprocess.PIPE, text=True)
    loss_log = tmp_path / "work" / "loss_log.jsonl"
    deadline = time.monotonic() + 120
    while not (loss_log.exists() and len(loss_log.read_text().splitlines()) >= 2):
        assert proc.poll() is None, f"training ended before it was signalled:\n{job_log.read_text()}"
        assert time.monotonic() < deadline, "training logged no step in 120 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)

    assert proc.returncode != 0, "a preempted job must fail so that Snakemake retries it"
    assert not (tmp_path / "artifact").exists() and not (tmp_path / "train.json").exists()
    saved = torch.load(tmp_path / "work" / CHECKPOINT, weights_only=True)["step"]
    assert 2 <= saved < 40
    assert f"SIGTERM after step {saved} of 40" in stderr
    assert f"SIGTERM after step {saved} of 40" in job_log.read_text()
    assert [r["step"] for r in read_jsonl(loss_log)] == list(range(1, saved + 1))

    summary = run_training(build(spec), **kwargs, device="cpu", threads=1)
    assert summary["resumed_from_step"] == saved
    assert [r["step"] for r in read_jsonl(tmp_path / "loss.jsonl")] == list(range(1, 41))
    assert not (tmp_path / "work" / CHECKPOINT).exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone once training ends
