"""Score a folder of samples (CLIP-T, CLIP-I, DINO-I, aesthetic) against a subject's references.

The workflow embeds each subject's reference photos once (`embed_references`), then scores every
variant's samples.jsonl with it (`evaluate_samples`); `score_references` gives the leave-one-out
upper bound that real photos of the subject reach.

Per-image scores are the interface to aggregate.py: every numeric column of the CSV that is not a
sample key is a metric there, and gets its mean, 95 % interval and paired delta against the base
variant in summary.csv with no change in aggregate. A new per-image metric is one more entry of
`scores_out` in `evaluate_samples` (and of COLUMNS).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ..io import atomic_path, read_jsonl
from . import scores

log = logging.getLogger(__name__)

SAMPLE_KEYS = ("file", "prompt", "eval_prompt", "prompt_index", "seed")
PROMPT_SET = "prompt_set"  # "eval", or "prior" for the class prompt's samples (rows without it: "eval")
METRIC_COLUMNS = ["clip_t", "clip_i", "dino_i", "aesthetic", "class_clip_i", "class_dino_i"]
COLUMNS = [*SAMPLE_KEYS, PROMPT_SET, *METRIC_COLUMNS, "degenerate"]
CHUNK = 64  # images held in memory at a time


def _open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def _write_csv(df: pd.DataFrame, out_csv) -> None:
    with atomic_path(out_csv) as tmp:
        df.to_csv(tmp, index=False)


def reference_files(image_dir) -> list[Path]:
    """The PNGs of a prepared subject folder, sorted by name."""
    files = sorted(p for p in Path(image_dir).iterdir() if p.is_file() and p.suffix.lower() == ".png")
    if not files:
        raise FileNotFoundError(f"no PNG images in reference folder {image_dir}")
    return files


def embed_references(image_dir, clip_path, dino_path, out_path, device=None, clip_options: dict | None = None) -> Path:
    """Embed every reference PNG once with CLIP (built as clip_options say: config.clip_options) and DINOv2.

    Writes a safetensors file with unit-norm "clip" [N, Dc] and "dino" [N, Dd] tensors; its
    metadata holds the file names (JSON list, row order) under "files".
    """
    from safetensors.torch import save_file

    from .encoders import ClipEncoder, DinoEncoder

    files = reference_files(image_dir)
    images = [_open_rgb(f) for f in files]
    tensors = {
        "clip": ClipEncoder.load(clip_path, device, **(clip_options or {})).encode_images(images).contiguous(),
        "dino": DinoEncoder.load(dino_path, device).encode_images(images).contiguous(),
    }
    metadata = {"files": json.dumps([f.name for f in files])}
    with atomic_path(out_path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    log.info("embedded %d reference images from %s into %s", len(files), image_dir, out_path)
    return Path(out_path)


def load_references(refs_path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(clip [N, Dc], dino [N, Dd], file names) from an `embed_references` file."""
    from safetensors import safe_open

    with safe_open(str(refs_path), framework="np") as f:
        files = json.loads((f.metadata() or {}).get("files", "[]"))
        return f.get_tensor("clip"), f.get_tensor("dino"), files


def score_references(refs_path, out_csv=None) -> pd.DataFrame:
    """Leave-one-out CLIP-I and DINO-I of each reference against the others (real-image upper bound)."""
    clip, dino, files = load_references(refs_path)
    df = pd.DataFrame({"file": files, "clip_i": scores.leave_one_out(clip), "dino_i": scores.leave_one_out(dino)})
    if out_csv is not None:
        _write_csv(df, out_csv)
    return df


def _check_dims(refs_path, name: str, refs: np.ndarray, dim: int) -> None:
    if refs.shape[1] != dim:
        raise ValueError(
            f"{refs_path}: {name!r} references are {refs.shape[1]}-d but the {name} model gives {dim}-d; "
            "re-embed the references with the same model"
        )


def read_samples(samples_dir) -> list[dict]:
    """Rows of samples_dir/samples.jsonl, checked for the keys scoring needs."""
    path = Path(samples_dir) / "samples.jsonl"
    rows = read_jsonl(path)
    if not rows:
        raise ValueError(f"{path}: no samples")
    for n, row in enumerate(rows, 1):
        missing = [k for k in SAMPLE_KEYS if k not in row]
        if missing:
            raise ValueError(f"{path}: row {n} lacks {', '.join(missing)}")
    return rows


def _references(path, clip, dino):
    """(clip [N, Dc], dino [N, Dd] or None) of an embed_references file, checked against the encoders."""
    if path is None:
        return None, None
    ref_clip, ref_dino, _ = load_references(path)
    _check_dims(path, "clip", ref_clip, clip.dim)
    if dino is not None:
        _check_dims(path, "dino", ref_dino, dino.dim)
    return ref_clip, (ref_dino if dino is not None else None)


def evaluate_samples(
    samples_dir,
    refs_path,
    clip_path,
    dino_path,
    aesthetic_path,
    out_csv,
    device=None,
    class_refs_path=None,
    oracle_path=None,
    subject: str | None = None,
    clip_options: dict | None = None,
) -> pd.DataFrame:
    """Score each sample listed in samples_dir/samples.jsonl and write one CSV row per image.

    clip_t compares the image with its eval_prompt (placeholder token replaced). clip_i and dino_i
    need refs_path (dino_i also dino_path) and are left empty otherwise; aesthetic needs
    aesthetic_path. class_clip_i and class_dino_i score the prior probe's samples (prompt_set
    "prior") against the class images embedded in class_refs_path. Degenerate images (black, NaN,
    flat) are scored too, but flagged. In the toy world, oracle_path adds the oracle's columns
    (`world.oracle.score_images`; `subject` is the one to find). clip_options: how the CLIP is built
    (config.clip_options: its model entry's quick_gelu).
    """
    from .encoders import AestheticScorer, ClipEncoder, DinoEncoder

    samples_dir = Path(samples_dir)
    rows = read_samples(samples_dir)
    clip = ClipEncoder.load(clip_path, device, **(clip_options or {}))
    wants_dino = dino_path is not None and (refs_path is not None or class_refs_path is not None)
    dino = DinoEncoder.load(dino_path, device) if wants_dino else None
    head = AestheticScorer.load(aesthetic_path, device) if aesthetic_path is not None else None
    ref_clip, ref_dino = _references(refs_path, clip, dino)
    class_clip, class_dino = _references(class_refs_path, clip, dino)
    prior = np.array([r.get(PROMPT_SET, "eval") == "prior" for r in rows])

    prompts = sorted({r["eval_prompt"] for r in rows})
    text = dict(zip(prompts, clip.encode_texts(prompts).numpy()))

    n = len(rows)
    scores_out = {k: np.full(n, np.nan) for k in METRIC_COLUMNS}
    degenerate = np.zeros(n, dtype=bool)
    oracle = None
    if oracle_path is not None:
        from ..world.oracle import Oracle, score_images

        oracle, extra = Oracle.load(oracle_path), {}
    for start in range(0, n, CHUNK):
        chunk = rows[start : start + CHUNK]
        at = slice(start, start + len(chunk))
        images = [_open_rgb(samples_dir / r["file"]) for r in chunk]
        degenerate[at] = [scores.is_degenerate(im) for im in images]
        embeds = clip.encode_images(images)
        image_embeds = embeds.numpy()
        dino_embeds = dino.encode_images(images).numpy() if dino is not None else None
        scores_out["clip_t"][at] = scores.clip_t(image_embeds, np.stack([text[r["eval_prompt"]] for r in chunk]))
        if ref_clip is not None:
            scores_out["clip_i"][at] = scores.clip_i(image_embeds, ref_clip)
        if ref_dino is not None:
            scores_out["dino_i"][at] = scores.dino_i(dino_embeds, ref_dino)
        if head is not None:
            scores_out["aesthetic"][at] = head.score(embeds).numpy()
        if class_clip is not None:
            scores_out["class_clip_i"][at] = np.where(prior[at], scores.clip_i(image_embeds, class_clip), np.nan)
        if class_dino is not None:
            scores_out["class_dino_i"][at] = np.where(prior[at], scores.dino_i(dino_embeds, class_dino), np.nan)
        if oracle is not None:
            cols = score_images(oracle, [np.asarray(im) for im in images], [r["prompt"] for r in chunk], subject)
            for k, v in cols.items():
                extra.setdefault(k, np.full(n, np.nan))[at] = v

    df = pd.DataFrame({k: [r[k] for r in rows] for k in SAMPLE_KEYS})
    df[PROMPT_SET] = [r.get(PROMPT_SET, "eval") for r in rows]
    for k, v in scores_out.items():
        df[k] = v
    df["degenerate"] = degenerate
    df = df[COLUMNS]
    if oracle is not None:
        for k, v in extra.items():
            df[k] = v
    if "true_aesthetic" in df and df["aesthetic"].notna().any():
        # The learned aesthetic's excess over the ground truth. Its paired delta to the base is what a
        # reward-trained variant gained on the reward but not in truth: reward hacking, measured.
        df["aesthetic_excess"] = df["aesthetic"] - df["true_aesthetic"]
    if degenerate.any():
        log.warning("%s: %d of %d samples are degenerate", samples_dir, degenerate.sum(), n)
    _write_csv(df, out_csv)
    return df
