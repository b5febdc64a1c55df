"""The method registry: declarations read without importing a method, checked, and a seventh method
(tests/extra_methods/bitfit.py) that joins by its module alone."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conceptbench import config as cb
from conceptbench import registry
from conceptbench.describe import describe
from conceptbench.train import MethodError, run_training

ROOT = Path(__file__).resolve().parents[1]
BITFIT = "extra_methods.bitfit"  # tests/ is on sys.path, as PYTHONPATH puts a researcher's folder there


def test_declarations_are_read_without_importing_the_methods():
    code = ("import sys; from conceptbench import config, registry; "
            "d = [registry.declaration(m) for m in registry.available_methods()]; "
            f"d.append(registry.declaration({BITFIT!r})); print(len(d), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": f"{ROOT / 'src'}:{ROOT / 'tests'}", "PATH": ""}).stdout.split()
    assert out == ["7", "False"]
    assert registry.available_methods() == ["custom_diffusion", "ddpo", "dreambooth", "lcm", "lora", "textual_inversion"]
    assert registry.declaration("ddpo")["h100_seconds_per_step"] == 180.0
    assert registry.declaration(BITFIT)["inputs"] == {"data": True}


def test_the_method_reads_the_declared_defaults():
    from conceptbench.methods.lcm import ARGS, LCM

    method = LCM({"loss_type": "huber"})
    assert method.args["loss_type"] == "huber"
    assert all(method.args[k] == spec["default"] for k, spec in ARGS.items() if k != "loss_type")
    with pytest.raises(MethodError, match="lcm has no argument 'ema_decy'; did you mean 'ema_decay'"):
        LCM({"ema_decy": 0.9})


@pytest.mark.parametrize("text, error", [
    ("ARGS = {'x': {'type': 'integer', 'minimun': 1, 'description': 'x.'}}",
     "ARGS['x'] says 'minimun'; did you mean 'minimum'?"),
    ("ARGS = {'x': {'type': 'integer', 'minimum': 1, 'default': 0, 'description': 'x.'}}",
     "ARGS['x']: the default 0 breaks its own schema"),
    ("ARGS = {'x': {'type': 'integer', 'default': 1}}", "ARGS['x'] needs a type (or enum) and a one-line description"),
    ("ARGS = {'x': {'type': 'integr', 'description': 'x.'}}", "ARGS['x'] is not a valid schema"),
    ("ARGS = {'x': {'same_as': 'dreambooth'}}", "ARGS['x'] is the same as dreambooth's, which has no 'x'"),
    ("ARGS = dict(x=1)", "ARGS must be a literal"),
    ("ARGS = {}\nINPUTS = {'dataset': True}", "INPUTS has no kind 'dataset'; did you mean 'data'?"),
    ("ARGS = {}\nINPUTS = {'clip': {'reward': 'aesthetic'}}", "INPUTS['clip'] must be true or {argument: value}"),
    ("ARGS = {}\nH100_SECONDS_PER_STEP = 0", "H100_SECONDS_PER_STEP must be a positive number"),
    ("ARGS = {}  # no H100_SECONDS_PER_STEP", "missing ['H100_SECONDS_PER_STEP']"),
])
def test_a_bad_declaration_is_refused_naming_the_file(tmp_path, text, error):
    """A typo in a method's own declarations stops it too, naming the file (each case adds what it lacks)."""
    rest = [line for key, line in (("INPUTS", "INPUTS = {}"), ("H100_SECONDS_PER_STEP", "H100_SECONDS_PER_STEP = 1.0"))
            if key not in text]
    path = tmp_path / "method.py"
    path.write_text("\n".join([text, *rest]) + "\n")
    with pytest.raises(ValueError) as err:
        registry.declaration_of(path)
    assert str(err.value).startswith(str(path)) and error in str(err.value)


def bitfit_config() -> dict:
    """The embedded default plus one experiment of the seventh method, swept over its one switch."""
    cfg = yaml.safe_load((ROOT / "config/tiny.yaml").read_text())
    cfg["experiments"]["bitfit"] = {
        "method": BITFIT, "task": "subject", "base_model": "sd15", "data": "dog", "resolution": 64,
        "subject_phrase": "sks dog", "class_phrase": "a dog", "prompts": ["sks dog in a bucket"],
        "metrics": ["clip_t", "clip_i", "dino_i"], "train": {"steps": 2, "learning_rate": 1e-3},
        "args": {"instance_prompt": "a photo of sks dog"},
        "sweep": {"param": "args.train_norms", "label": "norms", "values": [False, True]},
    }
    return cfg


def test_the_seventh_method_is_checked_like_the_others():
    cfg = cb.validate(bitfit_config())
    assert cb.resolve_variant(cfg, "bitfit", "norms-true")["args"] == {"instance_prompt": "a photo of sks dog",
                                                                      "train_norms": True}
    bad = bitfit_config()
    bad["experiments"]["bitfit"]["sweep"]["param"] = "args.train_norm"
    with pytest.raises(cb.ConfigError, match=r"bitfit.sweep.param: extra_methods.bitfit has no argument 'train_norm'; "
                                             r"did you mean 'train_norms'\?"):
        cb.validate(bad)
    text = describe(cb.load_schema(), BITFIT)
    assert "train_norms      boolean, default false: Also train the normalisation layers' scales." in text
    assert "BitFit: train only the U-Net's bias terms" in text


def test_the_seventh_method_trains_and_loads_back(tiny_pipeline_dir, instance_dir, tmp_path):
    spec = {"experiment": "bitfit", "variant": "norms-false", "method": BITFIT, "seed": 0, "resolution": 64,
            "train": {"steps": 2, "learning_rate": 1e-2, "checkpoint_every": 0},
            "args": {"instance_prompt": "a photo of sks cat"}}
    method = registry.build(spec)
    before = {k: v.clone() for k, v in load_file(str(tiny_pipeline_dir / "unet/diffusion_pytorch_model.safetensors")).items()}
    summary = run_training(method, spec, tiny_pipeline_dir, instance_dir, None, tmp_path / "artifact", tmp_path / "work",
                           tmp_path / "loss.jsonl", tmp_path / "train.json", device="cpu")
    after = method.unet.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(".bias") for k in changed)
    assert summary["trainable_params"] == sum(v.numel() for k, v in before.items() if k.endswith(".bias"))
    assert json.loads((tmp_path / "train.json").read_text())["method"] == BITFIT
    pipe = registry.get_method(BITFIT).load_pipeline(tmp_path / "artifact", tiny_pipeline_dir, spec, torch.device("cpu"))
    for key in changed:
        assert torch.equal(pipe.unet.state_dict()[key], after[key])


def test_dry_run_of_a_config_with_the_seventh_method(tmp_path):
    import os

    config = tmp_path / "bitfit.yaml"
    config.write_text(yaml.safe_dump(copy.deepcopy(bitfit_config())))
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "workflow/Snakefile"), "-d", str(tmp_path), "-n",
                           "--configfile", str(config)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for variant in ("norms-false", "norms-true"):
        assert f"results/train/bitfit/{variant}/artifact" in proc.stdout
    train_jobs = [job for job in proc.stdout.split("rule ") if job.startswith("train:") and "experiment=bitfit" in job]
    assert len(train_jobs) == 2 and all("input: resources/models/world/sd15, results/data/dog" in b for b in train_jobs)
