"""How the project installs: the lock agrees with pyproject's ranges and holds what the project needs."""

import sys
from pathlib import Path

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
