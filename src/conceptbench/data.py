"""Prepare datasets: every source becomes a folder of checked RGB PNGs plus metadata.jsonl.

Sources: a hub snapshot or local folder (loose images with an optional metadata.jsonl, parquet files
with image and text columns as lambdalabs/naruto-blip-captions ships, or webdataset .tar shards as
CC12M ships), or scenes drawn from the toy world (the embedded default). Nothing here imports torch.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Iterator

from PIL import Image

from .images import DataError, center_square, image_files, load_rgb, to_rgb
from .io import atomic_path, read_jsonl, write_jsonl

Item = tuple[str, Image.Image, str | None]  # (source name, image, caption or None)


def _skimage_items(spec: dict) -> Iterator[Item]:
    import skimage.data

    for name in spec["skimage"]:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            raise DataError(f"skimage: no bundled image named {name!r}")
        img = to_rgb(Image.fromarray(loader()))
        side = min(img.size)
        views = spec["views"]
        # `views` square crops sliding along the longer side (one crop when the image is square).
        for k in range(views):
            off = 0 if views == 1 else round(k * (max(img.size) - side) / (views - 1))
            box = (off, 0, off + side, side) if img.width >= img.height else (0, off, side, off + side)
            caption = spec["caption"].replace("{name}", name) if spec["caption"] else None
            yield f"skimage:{name}#{k}", img.crop(box), caption


def _world_items(spec: dict) -> Iterator[Item]:
    """Scenes drawn from the toy world (src/conceptbench/world): a subject's photographs, the held-out
    style with captions, or captioned base scenes (the stand-in for a web caption set)."""
    import numpy as np

    from .world import scene as sc

    w = spec["world"]
    rng = np.random.default_rng(w["seed"])
    if w["set"] == "subject":
        if w.get("subject") not in sc.SUBJECTS:
            raise DataError(f"world: subject must be one of {sorted(sc.SUBJECTS)}, got {w.get('subject')!r}")
        scenes = sc.subject_views(w["subject"], w["count"], w["seed"])
        captions = [None] * len(scenes)
    elif w["set"] == "style":
        scenes = [sc.sample_scene(rng, style="ninja", pair_p=0.0) for _ in range(w["count"])]
        # Half the captions name the style, half only the content, as a captioned style set does.
        captions = [sc.caption(s, style_prefix=bool(i % 2)) for i, s in enumerate(scenes)]
    else:
        scenes = [sc.sample_scene(rng) for _ in range(w["count"])]
        captions = [sc.caption(s) for s in scenes]
    for i, (scene, text) in enumerate(zip(scenes, captions)):
        yield f"world:{w['set']}:{w.get('subject', '')}#{i}", Image.fromarray(sc.render(scene)), text


def _captions(folder: Path) -> dict[str, str] | None:
    meta = folder / "metadata.jsonl"
    if not meta.exists():
        return None
    try:
        rows = read_jsonl(meta)
    except UnicodeDecodeError as e:
        raise DataError(f"{meta}: not UTF-8 text (byte {e.start})") from None
    captions = {}
    for n, row in enumerate(rows, 1):
        if "file_name" not in row:
            raise DataError(f"{meta}: line {n} has no file_name")
        captions[row["file_name"]] = row.get("text")
    return captions


def _folder_items(folder: Path, min_side: int) -> Iterator[Item]:
    captions = _captions(folder)
    for path in image_files(folder):
        caption = captions.get(path.name) if captions is not None else None
        yield str(path), load_rgb(path, min_side), caption


def _parquet_items(files: list[Path], min_side: int) -> Iterator[Item]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{files[0]}: reading parquet needs pyarrow (pip install pyarrow)") from None
    for f in files:
        table = pq.read_table(f)
        if "image" not in table.column_names:
            raise DataError(f"{f}: parquet without an 'image' column (columns: {table.column_names})")
        texts = table.column("text").to_pylist() if "text" in table.column_names else [None] * table.num_rows
        for i, (cell, text) in enumerate(zip(table.column("image").to_pylist(), texts)):
            yield f"{f}#{i}", _decode(cell["bytes"] if isinstance(cell, dict) else cell, f"{f}#{i}", min_side), text


def _tar_items(files: list[Path], min_side: int) -> Iterator[Item]:
    for f in files:
        with tarfile.open(f) as tar:
            samples: dict[str, dict[str, bytes]] = {}
            for member in tar:
                if member.isfile():
                    key, _, ext = member.name.rpartition(".")
                    samples.setdefault(key, {})[ext.lower()] = tar.extractfile(member).read()
        for key, parts in samples.items():
            image = next((parts[e] for e in ("jpg", "jpeg", "png", "webp") if e in parts), None)
            if image is None:
                continue
            text = parts["txt"].decode("utf-8") if "txt" in parts else None
            yield f"{f}:{key}", _decode(image, f"{f}:{key}", min_side), text


def _decode(data: bytes, name: str, min_side: int) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            rgb = to_rgb(img)
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{name}: not a readable image ({e})") from None
    if min(rgb.size) < min_side:
        raise DataError(f"{name}: {rgb.size[0]}x{rgb.size[1]} pixels, expected at least {min_side} on the shorter side")
    return rgb


def source_items(spec: dict, raw: Path | None) -> Iterator[Item]:
    """Yield (name, RGB image, caption) from whichever source the dataset spec names."""
    if spec.get("skimage"):
        yield from _skimage_items(spec)
        return
    if spec.get("world"):
        yield from _world_items(spec)
        return
    folder = Path(raw)
    if not folder.is_dir():
        raise DataError(f"{folder}: dataset folder does not exist")
    parquet = sorted(folder.rglob("*.parquet"))
    shards = sorted(folder.rglob("*.tar"))
    if parquet:
        yield from _parquet_items(parquet, spec["min_side"])
    elif shards:
        yield from _tar_items(shards, spec["min_side"])
    else:
        yield from _folder_items(folder, spec["min_side"])


def prepare_dataset(name: str, spec: dict, raw: Path | None, out_dir: Path) -> list[dict]:
    """Check, convert and write a dataset as 000000.png ... plus metadata.jsonl; return its rows."""
    rows = []
    # An image four times smaller than the training resolution would be upscaled into mush.
    min_side = max(spec["min_side"], spec["resolution"] // 4)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for source, img, caption in source_items(spec, raw):
            if len(rows) >= spec["max_images"]:
                break
            if min(img.size) < min_side:
                raise DataError(
                    f"{source}: {img.size[0]}x{img.size[1]} pixels, expected at least {min_side} on the shorter "
                    f"side for training at {spec['resolution']}"
                )
            if spec["kind"] == "captions" and not (caption or "").strip():
                raise DataError(f"{source}: dataset {name!r} has captions, but this image has none")
            file_name = f"{len(rows):06d}.png"
            center_square(img, spec["resolution"]).save(tmp / file_name)
            rows.append({"file_name": file_name, "text": caption, "source": source})
        if not rows:
            raise DataError(f"dataset {name!r}: no images found in {raw or spec.get('skimage')}")
        write_jsonl(tmp / "metadata.jsonl", rows)
    return rows


def read_prepared(folder: str | Path) -> list[tuple[Path, str | None]]:
    """(image path, caption) pairs of a prepared dataset folder."""
    folder = Path(folder)
    return [(folder / r["file_name"], r.get("text")) for r in read_jsonl(folder / "metadata.jsonl")]
