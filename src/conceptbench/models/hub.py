"""Fetch models from the Hugging Face hub at a pinned revision, in the layout their loaders read.

Each fetch downloads only the files the project's loaders read (see DEFAULT_ALLOW_PATTERNS), through
the pinned, fail-fast client in conceptbench/hub.py. Nothing here unpickles beyond torch.load's
weights_only=True: the aesthetic head's .pth is the one pickle, and it is converted to safetensors.

    python -m conceptbench.models.hub convert-aesthetic FILE.pth OUT_DIR
converts a .pth downloaded by hand into the folder layout that `load_aesthetic` reads.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Mapping
from pathlib import Path

from ..hub import DEFAULT_MAX_BYTES, PREFLIGHT_TIMEOUT_S, HubContentError, check_spec, download, one_line, write_source
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
    repo, revision = check_spec("model", name, spec)
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
        commit, files = download(
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
        write_source(tmp, record)
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
        raise ValueError(f"{pth}: does not fit the aesthetic head layout: {one_line(e)}") from None
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
