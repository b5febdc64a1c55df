"""Faults a cluster job meets: SIGKILL mid-training or mid-sampling, a full disk, an unwritable
results folder. Each ends in a clear message or a rerun that loses nothing."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conceptbench.jobs import job

ROOT = Path(__file__).resolve().parents[1]

DRIVER = r'''
import json, sys, time
from conceptbench.train import run_training
from conceptbench.sample import run_sampling

task = json.loads(sys.argv[1])
pause = task.pop("pause", 0)
def step_done(step):  # called after the step and its checkpoint
    print(f"step {step} done", flush=True)
    time.sleep(pause)

kind = task.pop("kind")
if kind == "train":
    from conceptbench.registry import build
    run_training(build(task["spec"]), **task, on_step_end=step_done)
elif kind == "evaluate":
    from conceptbench.metrics import evaluate
    plain_open = evaluate._open_rgb
    def slow_open(path):  # a pause per image, announced, so the kill lands mid-evaluation
        print(f"scoring {path}", flush=True)
        time.sleep(pause)
        return plain_open(path)
    evaluate._open_rgb = slow_open
    evaluate.CHUNK = 1
    evaluate.evaluate_samples(**task)
else:
    from conceptbench import sample
    plain = sample.image_name
    def slow_name(*a):  # a pause per image, so the kill lands mid-sampling
        time.sleep(pause)
        return plain(*a)
    sample.image_name = slow_name
    run_sampling(**task)
'''


def run_driver(tmp_path, task, kill_when=None):
    """Run one training or sampling job in a fresh process; SIGKILL it once `kill_when(line)` holds
    for a line it printed, or, given a path glob instead, once that path exists."""
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    errors = open(tmp_path / "driver.err", "w")  # progress bars; kept apart from the step lines
    proc = subprocess.Popen([sys.executable, str(script), json.dumps(task, default=str)], env=env,
                            stdout=subprocess.PIPE, stderr=errors, text=True)
    if kill_when is None:
        proc.communicate(timeout=600)
        assert proc.returncode == 0, (tmp_path / "driver.err").read_text()[-3000:]
        return
    deadline = time.monotonic() + 120
    if callable(kill_when):
        for line in proc.stdout:
            if kill_when(line):
                break
        else:
            raise AssertionError(f"the job ended before the kill point:\n{(tmp_path / 'driver.err').read_text()[-3000:]}")
    else:
        while not any(tmp_path.glob(kill_when)):
            assert proc.poll() is None, f"job ended before the kill point:\n{(tmp_path / 'driver.err').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "kill point never reached"
            time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def train_task(root, spec, tiny_pipeline_dir, instance_dir, class_dir, pause=0.0):
    return dict(kind="train", spec=spec, base_model=str(tiny_pipeline_dir), data_dir=str(instance_dir),
                class_dir=str(class_dir), artifact_dir=str(root / "artifact"), work_dir=str(root / "ckpt"),
                log_path=str(root / "loss.jsonl"), summary_path=str(root / "train.json"), pause=pause)


def unet_weights(artifact):
    return load_file(str(artifact / "unet" / "diffusion_pytorch_model.safetensors"))


def test_sigkill_during_training_resumes_to_the_same_weights(tmp_path, dreambooth_spec, tiny_pipeline_dir,
                                                              instance_dir, class_dir):
    dreambooth_spec["train"].update(steps=6, checkpoint_every=2)
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    run_driver(tmp_path, train_task(clean, dreambooth_spec, tiny_pipeline_dir, instance_dir, class_dir))
    # Kill once step 4 and its checkpoint are done, while steps 5-6 still run.
    task = train_task(killed, dreambooth_spec, tiny_pipeline_dir, instance_dir, class_dir, pause=0.5)
    run_driver(tmp_path, task, kill_when=lambda line: line.startswith("step 4 done"))
    assert not (killed / "artifact").exists()  # no half-written artifact for a later job to read
    assert (killed / "ckpt" / "checkpoint.pt").exists()
    task["pause"] = 0
    run_driver(tmp_path, task)
    assert json.loads((killed / "train.json").read_text())["resumed_from_step"] == 4
    a, b = unet_weights(clean / "artifact"), unet_weights(killed / "artifact")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise, on CPU


def test_sigkill_during_sampling_then_rerun_gives_the_same_images(tmp_path, dreambooth_spec, tiny_pipeline_dir):
    # DreamBooth's artifact is a full pipeline folder, so the base model itself can stand in for one.
    cfg = dict(prompts=[{"prompt": "sks dog", "eval_prompt": "a dog"}, {"prompt": "sks dog on grass", "eval_prompt": "a dog on grass"}],
               seeds=[0, 1, 2], steps=2, guidance_scale=7.5, batch_size=1, latency_repeats=0)

    def task(out, pause=0.0):
        return dict(kind="sample", spec=dreambooth_spec, base_model=str(tiny_pipeline_dir),
                    artifact_dir=str(tiny_pipeline_dir), cfg=cfg, out_dir=str(out), pause=pause)

    run_driver(tmp_path, task(tmp_path / "clean"))
    out = tmp_path / "killed"
    run_driver(tmp_path, task(out, pause=0.4), kill_when=".killed.*/killed/00_1.png")
    assert not out.exists()  # the half-written folder never took the output's name
    run_driver(tmp_path, task(out))
    for png in sorted((tmp_path / "clean").glob("*.png")):
        assert (out / png.name).read_bytes() == png.read_bytes()


def test_sigkill_during_evaluation_then_rerun_gives_the_same_scores(tmp_path, dreambooth_spec, tiny_pipeline_dir,
                                                                   instance_dir):
    from conceptbench.metrics.evaluate import embed_references
    from conceptbench.models.tiny import build_tiny_dinov2, build_tiny_open_clip
    from conceptbench.sample import run_sampling

    clip, dino = build_tiny_open_clip(tmp_path / "clip"), build_tiny_dinov2(tmp_path / "dino")
    samples = tmp_path / "samples"
    cfg = dict(prompts=[{"prompt": "sks dog", "eval_prompt": "a dog"}], seeds=[0, 1, 2, 3], steps=2,
               guidance_scale=7.5, batch_size=4, latency_repeats=0)
    run_sampling(dreambooth_spec, tiny_pipeline_dir, tiny_pipeline_dir, cfg, samples)
    refs = embed_references(instance_dir, clip, dino, tmp_path / "refs.safetensors")

    def task(out, pause=0.0):
        return dict(kind="evaluate", samples_dir=str(samples), refs_path=str(refs), clip_path=str(clip),
                    dino_path=str(dino), aesthetic_path=None, out_csv=str(out), pause=pause)

    run_driver(tmp_path, task(tmp_path / "clean.csv"))
    out = tmp_path / "killed.csv"
    run_driver(tmp_path, task(out, pause=0.5), kill_when=lambda line: "01_" in line or "_2.png" in line)
    assert not out.exists()  # no half-written table for aggregate to read
    run_driver(tmp_path, task(out))
    assert out.read_bytes() == (tmp_path / "clean.csv").read_bytes()


def test_full_disk_is_one_clear_line(tmp_path):
    log = tmp_path / "job.log"
    with pytest.raises(SystemExit):
        with job(str(log)):
            with open("/dev/full", "w") as f:
                f.write("x" * 10)
                f.flush()
    text = log.read_text()
    assert "error: no space left on the device" in text and "point `results:`" in text
    assert "Traceback" not in text


def test_known_errors_are_one_line_and_others_keep_their_traceback(tmp_path):
    from conceptbench.images import DataError

    with pytest.raises(SystemExit):
        with job(str(tmp_path / "a.log")):
            raise DataError("/data/dog/3.png: not a readable image")
    assert (tmp_path / "a.log").read_text().strip() == "error: /data/dog/3.png: not a readable image"
    with pytest.raises(SystemExit):
        with job(str(tmp_path / "b.log")):
            raise KeyError("surprise")
    assert "Traceback" in (tmp_path / "b.log").read_text()


def test_unwritable_results_folder_stops_before_any_job(tmp_path):
    import yaml

    cfg = yaml.safe_load((ROOT / "config/tiny.yaml").read_text())
    (tmp_path / "blocker").write_text("a file where a folder should be")
    cfg["results"] = str(tmp_path / "blocker" / "results")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "workflow/Snakefile"), "-d", str(tmp_path),
                           "-n", "--configfile", str(tmp_path / "c.yaml")], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0
    assert f"results: {cfg['results']} cannot be created: {tmp_path / 'blocker'} is a file" in proc.stdout + proc.stderr
