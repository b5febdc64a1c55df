"""Pinned downloads from the Hugging Face hub that fail fast and clearly where the hub is out of reach.

A fetch (models/hub.py for models, data_hub.py for datasets) downloads into a temporary folder beside
its output and renames it into place once complete, so a failed or interrupted fetch never leaves a
half-written folder behind; each fetched folder records where it came from (SOURCE_FILE).

Where the hub cannot be reached (HF_HUB_OFFLINE=1, no network, an unknown repo or revision) the
fetch fails at once with a HubUnavailable that names the config entry, the repo and the revision,
gives the reason in one line and says how to provide the files instead: download them on a machine
with hub access and point the entry's `path:` at that folder. A plain snapshot_download would
instead retry a dead connection for about 23 s before giving up; a single request with a short
timeout (`preflight`) answers first. Nothing here runs repository code (no trust_remote_code).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from collections.abc import Mapping
from pathlib import Path

PREFLIGHT_TIMEOUT_S = 10.0  # one request, no retries: the hub answers or the fetch fails
DEFAULT_MAX_BYTES = 16 * 2**30  # refuse downloads above this unless the caller raises it
SOURCE_FILE = "hub_source.json"  # provenance written into every fetched folder


class HubUnavailable(RuntimeError):
    """A model or dataset could not be fetched from the hub; the message says how to provide it."""

    def __init__(
        self,
        what: str,
        name: str,
        repo: str,
        revision: str,
        reason: str,
        repo_type: str = "model",
        allow_patterns: list[str] | None = None,
    ):
        self.what, self.name, self.repo, self.revision = what, name, repo, revision
        self.reason, self.repo_type = reason, repo_type
        self.command = hf_download_command(repo, revision, repo_type, allow_patterns)
        steps = (
            f"To provide it, download it on a machine with hub access:\n"
            f"    {self.command}\n"
            f"copy DIR here and set `path: DIR` for {what} {name!r} in the config instead of repo/revision."
        )
        pth = [p for p in allow_patterns or [] if p.endswith(".pth")]
        if what == "model" and pth:
            steps += (
                "\nFor an aesthetic head, convert the .pth first and point `path:` at the result:\n"
                f"    python -m conceptbench.models.hub convert-aesthetic {shlex.quote('DIR/' + pth[0])} OUT_DIR"
            )
        super().__init__(
            f"{what} {name!r} (repo {repo}, revision {revision}) could not be fetched from the Hugging Face "
            f"hub: {reason}\n{steps}"
        )


class HubContentError(RuntimeError):
    """The hub answered, but the pinned revision does not hold the files the project needs."""


def hf_download_command(repo: str, revision: str, repo_type: str = "model", allow_patterns=None) -> str:
    """The `hf download` command line that fetches the same files by hand (into DIR)."""
    parts = ["hf", "download", repo]
    if repo_type != "model":
        parts += ["--repo-type", repo_type]
    parts += ["--revision", revision]
    for pattern in allow_patterns or []:
        parts += ["--include", pattern]
    parts += ["--local-dir", "DIR"]
    return " ".join(shlex.quote(p) for p in parts)


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, now or when huggingface_hub was imported."""
    from huggingface_hub import constants

    def truthy(v: str | None) -> bool:
        return (v or "").strip().upper() in {"1", "ON", "YES", "TRUE"}

    env = truthy(os.environ.get("HF_HUB_OFFLINE")) or truthy(os.environ.get("TRANSFORMERS_OFFLINE"))
    return env or bool(constants.HF_HUB_OFFLINE)


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "(no message)"
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}"


def _reason(exc: BaseException, repo: str, revision: str, repo_type: str) -> str:
    """One line on why the hub call failed, most specific first."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, OfflineModeIsEnabled):
        return "offline mode is on (HF_HUB_OFFLINE is set)"
    if isinstance(exc, RevisionNotFoundError):
        return f"revision {revision} does not exist in {repo_type} repo {repo}"
    if isinstance(exc, GatedRepoError):
        return f"{repo_type} repo {repo} is gated: accept its terms and log in (hf auth login) first"
    if isinstance(exc, RepositoryNotFoundError):
        return f"{repo_type} repo {repo} not found (or private and no valid token)"
    if isinstance(exc, HfHubHTTPError) and getattr(exc, "response", None) is not None:
        return f"the hub answered HTTP {exc.response.status_code}: {one_line(exc)}"
    if exc.__cause__ is not None and not isinstance(exc, HfHubHTTPError):
        return _reason(exc.__cause__, repo, revision, repo_type)
    return f"the hub cannot be reached ({one_line(exc)})"


def _hub_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean 'the hub did not deliver' (as opposed to bugs or bad arguments)."""
    import httpx2
    from huggingface_hub.errors import (
        DryRunError,
        EntryNotFoundError,
        FileMetadataError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        XetDownloadError,
    )

    return (httpx2.HTTPError, HfHubHTTPError, OfflineModeIsEnabled, EntryNotFoundError, FileMetadataError,
            DryRunError, XetDownloadError, ConnectionError, TimeoutError)


def preflight(repo: str, revision: str, repo_type: str = "model", timeout: float = PREFLIGHT_TIMEOUT_S) -> str:
    """Ask the hub once (no retries) whether `revision` of `repo` exists; return its commit hash.

    Raises whatever huggingface_hub raises (OfflineModeIsEnabled, httpx2.ConnectError,
    RevisionNotFoundError, RepositoryNotFoundError, ...); `fetch_*` turn those into HubUnavailable.
    """
    from huggingface_hub import HfApi

    info = HfApi().repo_info(repo, revision=revision, repo_type=repo_type, timeout=timeout)
    if not info.sha:
        raise RuntimeError(f"the hub returned no commit for {repo}@{revision}")
    return info.sha


def check_spec(what: str, name: str, spec: Mapping) -> tuple[str, str]:
    if spec.get("trust_remote_code"):
        raise ValueError(f"{what} {name!r}: trust_remote_code is not supported; repository code is never run")
    repo, revision = spec.get("repo"), spec.get("revision")
    if not isinstance(repo, str) or not repo.strip():
        raise ValueError(f"{what} {name!r}: `repo` (a hub id such as owner/name) is required to fetch it")
    if not isinstance(revision, str) or not revision.strip():
        raise ValueError(
            f"{what} {name!r}: `revision` is required to fetch {repo} (pin a commit hash; downloads are never unpinned)"
        )
    return repo.strip(), revision.strip()


def download(
    what: str,
    name: str,
    repo: str,
    revision: str,
    repo_type: str,
    dest: Path,
    scratch: Path,
    allow_patterns: list[str] | None,
    ignore_patterns: list[str] | None,
    max_bytes: int | None,
    timeout: float,
) -> tuple[str, list[str]]:
    """Preflight, size check and snapshot_download into `dest`; return (commit hash, files)."""
    from huggingface_hub import snapshot_download

    def unavailable(exc: BaseException) -> HubUnavailable:
        return HubUnavailable(
            what, name, repo, revision, _reason(exc, repo, revision, repo_type), repo_type, allow_patterns
        )

    if hub_offline():
        raise HubUnavailable(
            what, name, repo, revision, "offline mode is on (HF_HUB_OFFLINE is set)", repo_type, allow_patterns
        )
    try:
        commit = preflight(repo, revision, repo_type, timeout=timeout)
    except _hub_errors() as e:
        raise unavailable(e) from e

    # Everything huggingface_hub writes (its cache, refs, tree listings) stays in the scratch folder.
    common = dict(
        repo_id=repo,
        repo_type=repo_type,
        revision=commit,
        cache_dir=str(scratch / "hf-cache"),
        local_dir=str(dest),
        allow_patterns=allow_patterns,
        ignore_patterns=ignore_patterns,
    )
    try:
        plan = snapshot_download(**common, dry_run=True)
        if not plan:
            raise HubContentError(
                f"{what} {name!r}: revision {commit} of {repo} has no file matching allow_patterns={allow_patterns!r}"
                f" ignore_patterns={ignore_patterns!r}"
            )
        total = sum(f.file_size or 0 for f in plan)
        if max_bytes is not None and total > max_bytes:
            raise HubContentError(
                f"{what} {name!r}: {len(plan)} files, {total / 2**30:.1f} GiB, from {repo}@{commit} exceed the "
                f"{max_bytes / 2**30:.1f} GiB limit; narrow allow_patterns or raise max_bytes"
            )
        snapshot_download(**common)
    except HubContentError:
        raise
    except _hub_errors() as e:
        raise unavailable(e) from e

    shutil.rmtree(dest / ".cache", ignore_errors=True)  # snapshot_download's local_dir metadata
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    return commit, files


def write_source(folder: Path, record: dict) -> None:
    (folder / SOURCE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
