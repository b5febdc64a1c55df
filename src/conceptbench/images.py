"""Reading images safely: every file is checked and converted to 8-bit RGB, or refused by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


class DataError(ValueError):
    """Input data that cannot be used; the message names the file or folder."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode (CMYK, 16-bit, float, palette, alpha, grayscale) to 8-bit RGB."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        scale = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / scale * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def load_rgb(path: str | Path, min_side: int = 1) -> Image.Image:
    """Open, fully decode and convert one image; raise DataError naming the file if it is unusable."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise DataError(f"{path}: empty file (0 bytes), expected an image")
        with Image.open(path) as img:
            img.load()
            rgb = to_rgb(img)
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from None
    if min(rgb.size) < min_side:
        raise DataError(f"{path}: {rgb.size[0]}x{rgb.size[1]} pixels, expected at least {min_side} on the shorter side")
    return rgb


def center_square(img: Image.Image, size: int) -> Image.Image:
    """Center-crop to a square and resize to `size` (Lanczos), as the DreamBooth examples do."""
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    return img.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)


def image_files(folder: str | Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
