"""Real class images by CLIP retrieval, Custom Diffusion's regularization set.

The study retrieved about 200 LAION images per class prompt through the clip-retrieval knn service,
which has been offline since 2024. Here the default backend embeds a prepared dataset (a local folder,
a hub dataset, webdataset shards: whatever `prepare_dataset` reads) with the project's CLIP, indexes
it with faiss (inner product on unit vectors, i.e. cosine) and takes the top k for the class prompt.
The knn-service client stays as the `knn_service` backend and fails with a clear error when the
service does not answer (request format of rom1504/clip-retrieval's ClipClient, reimplemented).
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from .data import read_prepared
from .images import DataError, center_square, image_files, load_rgb, to_rgb
from .io import atomic_path, read_json, write_json, write_jsonl

log = logging.getLogger(__name__)
INDEX_FILE, META_FILE = "index.faiss", "index.json"


def build_index(embeddings: np.ndarray):
    """A faiss inner-product index over unit-norm rows (cosine similarity)."""
    import faiss

    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    return index


def top_k(index, query: np.ndarray, k: int) -> tuple[list[int], list[float]]:
    """Row numbers and scores of the k nearest pool items to one unit-norm query, best first."""
    scores, ids = index.search(np.ascontiguousarray(query.reshape(1, -1), dtype=np.float32), k)
    return [int(i) for i in ids[0] if i >= 0], [float(s) for s, i in zip(scores[0], ids[0]) if i >= 0]


def index_pool(pool_dir: Path, encoder, out_dir: Path, chunk: int = 256) -> int:
    """Embed every image of a prepared dataset and write the faiss index with its file list."""
    import faiss

    files = image_files(pool_dir)
    if not files:
        raise DataError(f"{pool_dir}: the retrieval pool has no images")
    parts = []
    for start in range(0, len(files), chunk):  # a chunk of images in memory at a time
        parts.append(encoder.encode_images([load_rgb(p) for p in files[start : start + chunk]]).numpy())
        log.info("embedded %d of %d pool images", min(start + chunk, len(files)), len(files))
    embeddings = np.concatenate(parts)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        faiss.write_index(build_index(embeddings), str(tmp / INDEX_FILE))
        write_json(tmp / META_FILE, {"files": [p.name for p in files], "dim": int(embeddings.shape[1])})
    return len(files)


def retrieve_from_index(prompt: str, count: int, index_dir: Path, pool_dir: Path, encoder, out_dir: Path) -> list[dict]:
    """Copy the `count` pool images nearest to `prompt` into out_dir as 000000.png ... + metadata.jsonl, each
    with its caption in the pool (the prompt where it has none): Custom Diffusion trains each with it."""
    import faiss

    meta = read_json(Path(index_dir) / META_FILE)
    if count > len(meta["files"]):
        raise DataError(f"class_images.count {count} exceeds the {len(meta['files'])} images of the pool {pool_dir}")
    query = encoder.encode_texts([prompt]).numpy()[0]
    if query.shape[0] != meta["dim"]:
        raise DataError(f"{index_dir}: index of {meta['dim']}-d embeddings, but the CLIP gives {query.shape[0]}-d")
    ids, scores = top_k(faiss.read_index(str(Path(index_dir) / INDEX_FILE)), query, count)
    captions = {path.name: (text or "").strip() for path, text in read_prepared(pool_dir)} \
        if (Path(pool_dir) / "metadata.jsonl").is_file() else {}
    rows = []
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for rank, (i, score) in enumerate(zip(ids, scores)):
            name = f"{rank:06d}.png"
            shutil.copyfile(Path(pool_dir) / meta["files"][i], tmp / name)
            rows.append({"file_name": name, "text": captions.get(meta["files"][i]) or prompt, "query": prompt,
                         "source": meta["files"][i], "score": score})
        write_jsonl(tmp / "metadata.jsonl", rows)
    return rows


def knn_query(url: str, indice_name: str, prompt: str, count: int, timeout: float = 30.0) -> list[dict]:
    """Ask a clip-retrieval knn service for images of `prompt`: [{"url", "caption", "similarity"}]."""
    body = json.dumps({"text": prompt, "image": None, "image_url": None, "embedding_input": None,
                       "modality": "image", "num_images": count, "indice_name": indice_name,
                       "num_result_ids": count, "use_mclip": False, "deduplicate": True,
                       "use_safety_model": True, "use_violence_detector": True, "aesthetic_score": "",
                       "aesthetic_weight": ""}).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            results = json.loads(response.read())
    except (urllib.error.URLError, TimeoutError, OSError, ValueError) as e:
        raise DataError(f"clip-retrieval knn service {url} did not answer ({e}); it has been offline since 2024: "
                        "set class_images.backend to faiss with a local pool") from None
    if not isinstance(results, list):
        raise DataError(f"clip-retrieval knn service {url}: unexpected answer {str(results)[:200]}")
    return [r for r in results if r.get("url")]


def retrieve_from_service(prompt: str, count: int, url: str, indice_name: str, resolution: int, out_dir: Path,
                          timeout: float = 10.0) -> list[dict]:
    """Download the first `count` readable images the knn service returns, center-cropped to resolution, each
    with the caption the service gives (as diffusers' examples/custom_diffusion/retrieve.py keeps it)."""
    from PIL import Image

    hits = knn_query(url, indice_name, prompt, 2 * count)
    rows = []
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for hit in hits:
            if len(rows) == count:
                break
            try:
                with urllib.request.urlopen(hit["url"], timeout=timeout) as response:
                    img = to_rgb(Image.open(io.BytesIO(response.read())))
            except Exception as e:  # noqa: BLE001 - dead links are normal in LAION; skip them
                log.info("skipping %s (%s)", hit["url"], e)
                continue
            name = f"{len(rows):06d}.png"
            center_square(img, resolution).save(tmp / name)
            rows.append({"file_name": name, "text": (hit.get("caption") or "").strip() or prompt, "query": prompt,
                         "source": hit["url"], "score": hit.get("similarity")})
        if len(rows) < count:
            raise DataError(f"knn service {url}: only {len(rows)} of {count} images for {prompt!r} could be downloaded")
        write_jsonl(tmp / "metadata.jsonl", rows)
    return rows


def run_retrieval(cfg: dict, out_dir: Path, *, clip_dir: Path | None = None, index_dir: Path | None = None,
                  pool_dir: Path | None = None, device: str | None = None,
                  clip_options: dict | None = None) -> list[dict]:
    """What the retrieve_class_images rule runs. cfg: prompt, count, backend, resolution, knn_url, knn_index;
    clip_options: how the CLIP is built (config.clip_options)."""
    if cfg["backend"] == "knn_service":
        return retrieve_from_service(cfg["prompt"], int(cfg["count"]), cfg["knn_url"], cfg["knn_index"],
                                     int(cfg["resolution"]), Path(out_dir))
    from .metrics.encoders import ClipEncoder

    encoder = ClipEncoder.load(clip_dir, device=device, **(clip_options or {}))
    return retrieve_from_index(cfg["prompt"], int(cfg["count"]), Path(index_dir), Path(pool_dir), encoder, Path(out_dir))
