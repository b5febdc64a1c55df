"""Write the lock (constraints.txt): the exact versions of a working environment, for `make demo`.

    .venv/bin/python tools/lock.py > constraints.txt

Run it with the interpreter of an environment where the project and all its extras are installed
and the tests pass. It starts from pyproject.toml's dependencies and extras, walks their
requirements through the installed distributions and pins each one it reaches: the lock holds what
the project needs and nothing else that happens to be installed. pyproject.toml keeps the
compatible ranges; the lock, the versions that were tested together.
"""

from __future__ import annotations

import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _applies(req: Requirement, extras: tuple[str, ...]) -> bool:
    """Whether `req` applies on this interpreter when its dependent is installed with `extras`."""
    return req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *extras))


def project_requirements(pyproject: Path = PYPROJECT) -> list[Requirement]:
    """The project's dependencies plus those of every extra."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    lines = project["dependencies"] + [r for extra in project.get("optional-dependencies", {}).values() for r in extra]
    return [Requirement(line) for line in lines]


def pins(roots: list[Requirement]) -> dict[str, str]:
    """{distribution: installed version} of everything `roots` need here, transitively."""
    found, seen, todo = {}, set(), [r for r in roots if _applies(r, ())]
    while todo:
        req = todo.pop()
        key = (canonicalize_name(req.name), tuple(sorted(req.extras)))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            sys.exit(f"lock: {req.name} is required but not installed in {sys.prefix}")
        found[key[0]] = dist.version
        todo += [r for r in map(Requirement, dist.requires or []) if _applies(r, key[1])]
    return dict(sorted(found.items()))


def main() -> None:
    here = ".".join(map(str, sys.version_info[:3]))
    print(f"# Exact versions tested together (Python {here}, Linux x86_64), written by tools/lock.py from the")
    print("# environment the tests passed in. Installed with `pip install -c constraints.txt ...` (Makefile, .ci/run);")
    print("# pyproject.toml states the compatible ranges.")
    for name, version in pins(project_requirements()).items():
        print(f"{name}=={version}")


if __name__ == "__main__":
    main()
