"""Pure scoring functions on embeddings and pixels (numpy only; torch tensors on the CPU work too).

All similarities are cosines, so inputs need not be normalised:
- CLIP-T: cos(image, its prompt), one per image;
- CLIP-I / DINO-I: mean cosine of an image to every reference image;
- leave-one-out: each reference scored against the others, the real-image upper bound.
"""

from __future__ import annotations

import numpy as np

# A generated image whose every channel varies less than this (pixels on a 0..1 scale) is flat.
MIN_PIXEL_STD = 2 / 255
# ...and one whose brightest pixel is below this is black.
MAX_BLACK_PIXEL = 2 / 255


def normalize(x) -> np.ndarray:
    """Rows scaled to unit L2 norm (float64); a zero row stays zero rather than turning into NaN."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm == 0, 1.0, norm)


def _rows(x, name: str) -> np.ndarray:
    x = normalize(x)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected an [N, D] array, got shape {x.shape}")
    return x


def clip_t(image_embeds, text_embeds) -> np.ndarray:
    """CLIP-T per image: cosine between row i of the image and row i of the text embeddings."""
    images, texts = _rows(image_embeds, "image_embeds"), _rows(text_embeds, "text_embeds")
    if images.shape != texts.shape:
        raise ValueError(f"clip_t pairs rows: image {images.shape} vs text {texts.shape}")
    return np.einsum("nd,nd->n", images, texts)


def mean_reference_similarity(image_embeds, ref_embeds) -> np.ndarray:
    """Per image, the mean cosine to each reference (the formula behind CLIP-I and DINO-I)."""
    images, refs = _rows(image_embeds, "image_embeds"), _rows(ref_embeds, "ref_embeds")
    if len(refs) == 0:
        raise ValueError("no reference embeddings")
    if images.shape[1] != refs.shape[1]:
        raise ValueError(f"embedding sizes differ: images {images.shape[1]}-d, references {refs.shape[1]}-d")
    return (images @ refs.T).mean(axis=1)


def clip_i(image_embeds, ref_embeds) -> np.ndarray:
    """CLIP-I per image, from CLIP image embeddings."""
    return mean_reference_similarity(image_embeds, ref_embeds)


def dino_i(image_embeds, ref_embeds) -> np.ndarray:
    """DINO-I per image, from DINOv2 CLS embeddings."""
    return mean_reference_similarity(image_embeds, ref_embeds)


def leave_one_out(ref_embeds) -> np.ndarray:
    """Per reference, the mean cosine to the other references: what a real photo would score."""
    refs = _rows(ref_embeds, "ref_embeds")
    n = len(refs)
    if n < 2:
        raise ValueError(f"leave-one-out needs at least 2 references, got {n}")
    sims = refs @ refs.T
    return (sims.sum(axis=1) - np.diag(sims)) / (n - 1)


def degenerate_reason(image) -> str | None:
    """Why an image is unusable ('non-finite', 'black', 'constant'), or None if it is fine.

    Takes a PIL image or an array; integer pixels are read on a 0..255 scale, floats on 0..1.
    Flatness is judged per channel, so a uniformly coloured image counts as constant.
    """
    pixels = np.asarray(image)
    if np.issubdtype(pixels.dtype, np.integer) or pixels.dtype == bool:
        pixels = pixels.astype(np.float64) / (1.0 if pixels.dtype == bool else 255.0)
    pixels = pixels.astype(np.float64)
    if pixels.size == 0 or not np.isfinite(pixels).all():
        return "non-finite"
    if pixels.max() < MAX_BLACK_PIXEL:
        return "black"
    channels = pixels.reshape(-1, pixels.shape[-1]) if pixels.ndim == 3 else pixels.reshape(-1, 1)
    if channels.std(axis=0).max() < MIN_PIXEL_STD:
        return "constant"
    return None


def is_degenerate(image) -> bool:
    """True for all-black, NaN-carrying or flat images (see `degenerate_reason`)."""
    return degenerate_reason(image) is not None


def bootstrap_ci(values, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean; the same seed gives the same interval."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if len(values) == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if not np.isfinite(values).all():
        raise ValueError("bootstrap_ci got NaN or infinite values; drop them first")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)
