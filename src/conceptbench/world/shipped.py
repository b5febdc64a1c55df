"""The toy world's models as the repository ships them, and their installation for the workflow.

`build.py` trains them in fp32; `export` stores each weight file in fp16 (half the bytes; the models
are small enough that fp16 storage costs nothing measurable, see quality.md) and leaves out the CLIP
tokenizer files, which `install` writes again from open_clip's BPE file. `install` gives the workflow
the ordinary layouts, in fp32: a StableDiffusionPipeline folder, an open_clip 'local-dir:' folder, a
transformers DINOv2 folder, the aesthetic head and the oracle.
"""

from __future__ import annotations

import shutil
from pathlib import Path

SHIPPED = Path(__file__).parent / "models"
MODELS = ("sd", "clip", "dino", "aesthetic", "oracle")
KINDS = {"sd": "diffusion", "clip": "open_clip", "dino": "dinov2", "aesthetic": "aesthetic", "oracle": "oracle"}
RECORDS = ("build.log", "quality.md", "quality.json")


def _cast_folder(src: Path, dest: Path, dtype) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if path.is_dir() or rel.parts[0] == "tokenizer":
            continue
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".safetensors":
            state = load_file(str(path))
            save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, str(out),
                      metadata={"format": "pt"})
        else:
            shutil.copyfile(path, out)
    if dtype == torch.float32 and (src / "model_index.json").exists():
        from ..models.tokenizer import write_clip_tokenizer_files

        write_clip_tokenizer_files(dest / "tokenizer")


def export(built: Path, dest: Path = SHIPPED) -> Path:
    """Copy a finished build into the repository's shipped folder, weights in fp16."""
    import torch

    built, dest = Path(built), Path(dest)
    missing = [m for m in MODELS if not (built / m).is_dir()]
    if missing:
        raise FileNotFoundError(f"{built}: the build has no {', '.join(missing)} yet")
    if dest.exists():
        shutil.rmtree(dest)
    for name in MODELS:
        _cast_folder(built / name, dest / name, torch.float16)
    for rec in RECORDS:
        if (built / rec).exists():
            shutil.copyfile(built / rec, dest / rec)
    return dest


def install(name: str, dest: Path, shipped: Path = SHIPPED, kind: str | None = None) -> Path:
    """Write shipped model `name` to `dest` in fp32, in the layout its loader reads."""
    import torch

    if name not in MODELS:
        raise ValueError(f"world model {name!r} does not exist; the toy world has {', '.join(MODELS)}")
    if kind is not None and KINDS.get(name) != kind:
        raise ValueError(f"world model {name!r} is a {KINDS.get(name)} model, not kind {kind!r}")
    src = Path(shipped) / name
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: the toy world's {name} model is not there; build it with `make world`")
    _cast_folder(src, Path(dest), torch.float32)
    return Path(dest)
