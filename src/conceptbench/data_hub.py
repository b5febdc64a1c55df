"""Fetch a dataset from the Hugging Face hub at its pinned revision (the client's rules: hub.py)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from .hub import DEFAULT_MAX_BYTES, PREFLIGHT_TIMEOUT_S, check_spec, download, write_source
from .io import atomic_path

DATASET_IGNORE_PATTERNS = [".gitattributes"]


def fetch_dataset(name: str, spec: Mapping, out_dir: Path, *, max_bytes: int | None = DEFAULT_MAX_BYTES,
                  timeout: float = PREFLIGHT_TIMEOUT_S) -> Path:
    """Download dataset `name` (spec: repo, revision, optional allow_patterns) into `out_dir` as the
    repo lays it out (minus .gitattributes). Returns `out_dir`.

    Without allow_patterns the whole repo is fetched, so a large one (CC12M's webdataset is terabytes)
    stops at `max_bytes`: give allow_patterns such as ["cc12m-train-0000.tar"] for it.
    """
    out_dir = Path(out_dir)
    repo, revision = check_spec("dataset", name, spec)
    patterns = list(spec["allow_patterns"]) if spec.get("allow_patterns") else None
    with atomic_path(out_dir) as tmp:
        commit, files = download(
            "dataset", name, repo, revision, "dataset", tmp, tmp.parent, patterns, DATASET_IGNORE_PATTERNS,
            max_bytes, timeout,
        )
        write_source(tmp, {
            "what": "dataset", "name": name, "repo": repo, "revision": revision, "commit": commit,
            "allow_patterns": patterns, "files": files,
        })
    return out_dir
