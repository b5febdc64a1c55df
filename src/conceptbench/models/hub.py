"""Fetch models and datasets from the Hugging Face hub at a pinned revision.

Each fetch downloads only the files the project's loaders read (see DEFAULT_ALLOW_PATTERNS) into a
temporary folder beside the output and renames it into place once complete, so a failed or
interrupted fetch never leaves a half-written folder behind.

Where the hub cannot be reached (HF_HUB_OFFLINE=1, no network, an unknown repo or revision) the
fetch fails at once with a HubUnavailable that names the config entry, the repo and the revision,
gives the reason in one line and says how to provide the files instead: download them on a machine
with hub access and point the entry's `path:` at that folder. A plain snapshot_download would
instead retry a dead connection for about 23 s before giving up; a single request with a short
timeout (`preflight`) answers first.

Nothing here runs repository code (no trust_remote_code) or unpickles beyond torch.load's
weights_only=True: the aesthetic head's .pth is the one pickle, and it is converted to safetensors.

    python -m conceptbench.models.hub convert-aesthetic FILE.pth OUT_DIR
converts a .pth downloaded by hand into the folder layout that `load_aesthetic` reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shlex
import shutil
from collections.abc import Mapping
from pathlib import Path

from ..io import atomic_path

KINDS = ("diffusion", "open_clip", "dinov2", "aesthetic")

# The LAION improved aesthetic predictor's file name in christophschuhmann/improved-aesthetic-predictor
# and in the hub repos that mirror it (camenduru/improved-aesthetic-predictor); trl-lib's copy is
# named aesthetic-model.pth (set `filename` for it).
AESTHETIC_FILENAME = "sac+logos+ava1-l14-linearMSE.pth"

# The files each kind of model needs, and only those: fp32 safetensors weights, configs, tokenizer.
# Patterns are fnmatch-style on repo paths ("*" also matches "/"), as snapshot_download applies them.
# For diffusion: no safety_checker/feature_extractor, no .ckpt/.bin, no *.fp16.safetensors variants,
# no single-file checkpoints at the repo root (v1-5-pruned*.safetensors).
DEFAULT_ALLOW_PATTERNS: dict[str, list[str]] = {
    "diffusion": [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "tokenizer/*",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ],
    "open_clip": ["open_clip_config.json", "open_clip_model.safetensors"],
    "dinov2": ["config.json", "model.safetensors", "preprocessor_config.json"],
}

# Files that must be present after a download; a revision without them cannot be loaded.
REQUIRED_FILES: dict[str, list[str]] = {
    "diffusion": [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ],
    "open_clip": ["open_clip_config.json", "open_clip_model.safetensors"],
    "dinov2": ["config.json", "model.safetensors", "preprocessor_config.json"],
}

DATASET_IGNORE_PATTERNS = [".gitattributes"]

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


def _one_line(exc: BaseException) -> str:
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
        return f"the hub answered HTTP {exc.response.status_code}: {_one_line(exc)}"
    if exc.__cause__ is not None and not isinstance(exc, HfHubHTTPError):
        return _reason(exc.__cause__, repo, revision, repo_type)
    return f"the hub cannot be reached ({_one_line(exc)})"


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


def _check_spec(what: str, name: str, spec: Mapping) -> tuple[str, str]:
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


def _download(
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


def _write_source(folder: Path, record: dict) -> None:
    (folder / SOURCE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _drop_missing_components(folder: Path) -> list[str]:
    """Null the model_index.json entries whose folders were not downloaded (safety checker,
    feature extractor), so the folder loads as it is, like a pipeline saved with safety_checker=None."""
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    dropped = []
    for key, value in index.items():
        if key.startswith("_") or not isinstance(value, list) or len(value) != 2 or value == [None, None]:
            continue
        if not (folder / key).is_dir():
            index[key] = [None, None]
            dropped.append(key)
    if "safety_checker" in dropped and "requires_safety_checker" in index:
        index["requires_safety_checker"] = False
    if dropped:
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return dropped


def fetch_model(name: str, spec: Mapping, out_dir: Path, *, max_bytes: int | None = DEFAULT_MAX_BYTES,
                timeout: float = PREFLIGHT_TIMEOUT_S) -> Path:
    """Download model `name` (spec: repo, revision, kind, optional allow_patterns / filename / sha256)
    into `out_dir`, in the layout the project's loader for that kind reads. Returns `out_dir`.

    Raises HubUnavailable when the hub cannot deliver it (offline, unreachable, unknown repo or
    revision), HubContentError when the pinned revision lacks the needed files, ValueError on a bad spec.
    """
    out_dir = Path(out_dir)
    repo, revision = _check_spec("model", name, spec)
    kind = spec.get("kind")
    if kind not in KINDS:
        raise ValueError(f"model {name!r}: kind must be one of {KINDS}, not {kind!r}")

    filename = spec.get("filename") or AESTHETIC_FILENAME
    if kind == "aesthetic":
        patterns = list(spec.get("allow_patterns") or [filename])
    else:
        patterns = list(spec.get("allow_patterns") or DEFAULT_ALLOW_PATTERNS[kind])

    with atomic_path(out_dir) as tmp:
        scratch = tmp.parent
        dest = scratch / "download" if kind == "aesthetic" else tmp
        commit, files = _download(
            "model", name, repo, revision, "model", dest, scratch, patterns, None, max_bytes, timeout
        )
        record = {
            "what": "model", "name": name, "kind": kind, "repo": repo, "revision": revision,
            "commit": commit, "allow_patterns": patterns, "files": files,
        }
        if kind == "aesthetic":
            pth = dest / filename
            if not pth.is_file():
                raise HubContentError(f"model {name!r}: {repo}@{commit} has no file {filename!r}")
            digest = _sha256(pth)
            if spec.get("sha256") and digest != spec["sha256"].lower():
                raise HubContentError(
                    f"model {name!r}: {filename} from {repo}@{commit} has sha256 {digest}, expected {spec['sha256']}"
                )
            convert_aesthetic(pth, tmp)
            record.update(source_file=filename, source_sha256=digest, files=sorted(p.name for p in tmp.iterdir()))
        else:
            missing = [f for f in REQUIRED_FILES[kind] if not (tmp / f).is_file()]
            if missing:
                raise HubContentError(
                    f"model {name!r}: {repo}@{commit} lacks {missing} that a {kind} model needs "
                    f"(downloaded with allow_patterns={patterns!r})"
                )
            if kind == "diffusion":
                record["model_index_nulled"] = _drop_missing_components(tmp)
        _write_source(tmp, record)
    return out_dir


def fetch_dataset(name: str, spec: Mapping, out_dir: Path, *, max_bytes: int | None = DEFAULT_MAX_BYTES,
                  timeout: float = PREFLIGHT_TIMEOUT_S) -> Path:
    """Download dataset `name` (spec: repo, revision, optional allow_patterns) into `out_dir` as the
    repo lays it out (minus .gitattributes). Returns `out_dir`.

    Without allow_patterns the whole repo is fetched, so a large one (CC12M's webdataset is terabytes)
    stops at `max_bytes`: give allow_patterns such as ["cc12m-train-0000.tar"] for it.
    """
    out_dir = Path(out_dir)
    repo, revision = _check_spec("dataset", name, spec)
    patterns = list(spec["allow_patterns"]) if spec.get("allow_patterns") else None
    with atomic_path(out_dir) as tmp:
        commit, files = _download(
            "dataset", name, repo, revision, "dataset", tmp, tmp.parent, patterns, DATASET_IGNORE_PATTERNS,
            max_bytes, timeout,
        )
        _write_source(tmp, {
            "what": "dataset", "name": name, "repo": repo, "revision": revision, "commit": commit,
            "allow_patterns": patterns, "files": files,
        })
    return out_dir


# ----------------------------------------------------------------------------- aesthetic head


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_pth_state_dict(pth: Path) -> dict:
    """torch.load with weights_only=True: plain containers of tensors and numbers load, any other
    pickled object is refused (ValueError) without being constructed."""
    import torch

    try:
        state = torch.load(str(pth), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{pth}: refused by weights_only loading (not a plain tensor state dict): {first}") from e
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{pth}: expected a state dict (a mapping of names to tensors), got {type(state).__name__}")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{pth}: state dict entries that are not tensors: {bad[:5]}")
    return dict(state)


def convert_aesthetic(pth: Path, out_dir: Path) -> Path:
    """Convert the LAION aesthetic predictor's .pth state dict into config.json + model.safetensors.

    Keys are "layers.{0,2,4,6,7}.{weight,bias}" (an nn.Sequential saved without the wrapper, keys
    "0.weight" ..., is accepted too); in_dim and hidden widths are read off the weight shapes, so the
    real file gives {"in_dim": 768, "hidden": [1024, 128, 64, 16]}. The head is rebuilt and loaded
    strictly before saving, so a file of another shape is refused here, not at scoring time.
    """
    from safetensors.torch import save_file

    from ..metrics.aesthetic import AestheticMLP

    pth, out_dir = Path(pth), Path(out_dir)
    state = load_pth_state_dict(pth)
    if state and all(k.split(".", 1)[0].isdigit() for k in state):
        state = {f"layers.{k}": v for k, v in state.items()}
    linear = [f"layers.{i}.weight" for i in (0, 2, 4, 6, 7)]
    missing = [k for k in linear if k not in state]
    if missing:
        raise ValueError(f"{pth}: not a LAION aesthetic head state dict (missing {missing}; has {sorted(state)[:6]})")
    in_dim = int(state["layers.0.weight"].shape[1])
    hidden = [int(state[k].shape[0]) for k in linear[:4]]
    model = AestheticMLP(in_dim=in_dim, hidden=tuple(hidden))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{pth}: does not fit the aesthetic head layout: {_one_line(e)}") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps({"in_dim": in_dim, "hidden": hidden}) + "\n", encoding="utf-8")
    tensors = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(out_dir / "model.safetensors"))
    return out_dir


def _main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m conceptbench.models.hub")
    sub = parser.add_subparsers(dest="cmd", required=True)
    conv = sub.add_parser("convert-aesthetic", help="convert an aesthetic head .pth into config.json + model.safetensors")
    conv.add_argument("pth", type=Path)
    conv.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "convert-aesthetic":
        with atomic_path(args.out_dir) as tmp:
            convert_aesthetic(args.pth, tmp)
        print(args.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
