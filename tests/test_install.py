"""How the project installs and is reused: the lock against pyproject's ranges, a non-editable
`pip install`, and the workflow as a module of a user's own workflow."""

import copy
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pandas as pd
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import lock  # noqa: E402


def locked() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    reqs = [Requirement(line) for line in lines if line and not line.startswith("#")]
    assert all(len(r.specifier) == 1 and next(iter(r.specifier)).operator == "==" for r in reqs)
    return {canonicalize_name(r.name): next(iter(r.specifier)).version for r in reqs}


def test_lock_pins_every_requirement_within_its_range():
    pins = locked()
    for req in lock.project_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt pins no {req.name}"
        assert req.specifier.contains(pins[name]), f"constraints.txt: {name}=={pins[name]} is outside {req}"


def test_lock_walks_the_requirements_of_the_installed_environment():
    pins = lock.pins(lock.project_requirements())
    assert {"torch", "snakemake", "pytest", "bitsandbytes"} <= set(pins)  # dependencies and both extras
    assert {"jsonschema-specifications", "snakemake-interface-common"} <= set(pins)  # reached through them
    assert "pip" not in pins and "conceptbench" not in pins  # installed here, needed by nothing


def run(*cmd, cwd):
    """A command as a user runs it: from `cwd`, without the PYTHONPATH a developer's shell may set."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env={**env, "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def job_count(dry_run_output: str, rule: str) -> int:
    return int(re.search(rf"^{rule}\s+(\d+)$", dry_run_output, re.M).group(1))


@pytest.mark.slow  # 14 to 27 s on the 2-core VM: a venv, a wheel build, a dry-run
def test_pip_install_runs_the_embedded_default_from_outside_the_checkout(tmp_path):
    """`pip install <project>` (not editable) into a fresh venv: the package carries its data files,
    and the workflow, copied without the checkout's src/ as a remote module has it, finds the
    library, its schema and the study's numbers in the installed package."""
    venv, outside = tmp_path / "venv", tmp_path / "elsewhere"
    outside.mkdir()
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    # pip, setuptools and the dependencies come from this environment (installing torch again takes
    # minutes); the project itself is built into a wheel and installed as a user's `pip install .` does.
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=outside).strip())
    (site / "dependencies.pth").write_text("\n".join({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}))
    project = tmp_path / "project"  # the files a build reads; a build in place would write build/ into the checkout
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    run(python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", project, cwd=outside)

    where = run(python, "-c", "import conceptbench; print(conceptbench.__file__)", cwd=outside)
    assert Path(where.strip()).is_relative_to(site)
    # Every file of the package that is not code (the schema, the study's numbers, the toy world's models).
    package = project / "src/conceptbench"
    data = {p.relative_to(package) for p in package.rglob("*") if p.is_file() and p.suffix != ".py"}
    installed = {p.relative_to(site / "conceptbench") for p in (site / "conceptbench").rglob("*") if p.is_file()}
    assert data and data <= installed, f"not installed: {sorted(map(str, data - installed))}"

    workflow = tmp_path / "workflow-only"
    for name in ("workflow", "envs"):
        shutil.copytree(ROOT / name, workflow / name)
    out = run(python, "-m", "snakemake", "-n", "-s", workflow / "workflow/Snakefile",
              "--configfile", ROOT / "config/tiny.yaml", cwd=outside)
    tiny = yaml.safe_load((ROOT / "config/tiny.yaml").read_text())
    variants = sum(len(e["sweep"]["values"]) for e in tiny["experiments"].values() if e.get("enabled", True))
    assert job_count(out, "train") == variants and job_count(out, "aggregate") == 1


@pytest.mark.slow  # about 130 s of CPU: a LoRA variant and the base sampled, scored, summarized, reported
def test_a_users_workflow_runs_this_one_as_a_module(tmp_path):
    """A user's project: its own config (the embedded default cut to one LoRA variant of 4 steps)
    and a Snakefile that uses this workflow as a module. Everything lands in the user's folder."""
    project = tmp_path / "project"
    (project / "config").mkdir(parents=True)
    (project / "workflow").mkdir()
    config = copy.deepcopy(yaml.safe_load((ROOT / "config/tiny.yaml").read_text()))
    for name, exp in config["experiments"].items():
        exp["enabled"] = name == "lora"
    lora = config["experiments"]["lora"]
    lora["sweep"]["values"] = [4]
    lora["train"].update(steps=4, batch_size=2, checkpoint_every=2, log_every=1)
    config["evaluation"].update(seeds=1, latency_repeats=1)
    (project / "config/config.yaml").write_text(yaml.safe_dump(config))
    (project / "workflow/Snakefile").write_text(f"""\
configfile: "config/config.yaml"


module conceptbench:
    snakefile:
        "{ROOT / 'workflow/Snakefile'}"
    config:
        config


use rule * from conceptbench
""")
    run(sys.executable, "-m", "snakemake", "--cores", "2", cwd=project)

    summary = pd.read_csv(project / "results/tables/summary.csv")
    assert list(zip(summary["experiment"], summary["variant"], summary["role"])) == [
        ("lora", "base", "baseline"), ("lora", "rank-4", "trained")]
    assert summary["clip_t"].notna().all()
    assert (project / "results/tables/summary.md").read_text().count("rank-4") >= 1
    assert (project / "resources/models/world/sd15").is_dir()  # the toy world's, installed from the package
    run(sys.executable, "-m", "snakemake", "--report", "report.html", cwd=project)  # with the module's captions
    assert "rank-4" in (project / "report.html").read_text()
