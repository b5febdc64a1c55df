"""A prepared captioned dataset (PNG files + metadata.jsonl), read a random batch at a time.

Images are loaded when drawn, not all up front, so a 100,000-image caption set costs no memory;
the VAE then encodes each batch on the device (as LCM training does). A small set trained for many
steps is better encoded once (EncodedCaptions, LoRA's default).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import runtime
from ..data import read_prepared
from ..images import DataError, center_square, load_rgb


class CaptionedImages:
    def __init__(self, folder: Path, resolution: int):
        self.pairs = read_prepared(folder)
        if not self.pairs:
            raise DataError(f"{folder}: no images in metadata.jsonl")
        missing = [p.name for p, text in self.pairs if not (text or "").strip()]
        if missing:
            raise DataError(f"{folder}: {len(missing)} images have no caption (first: {missing[0]})")
        self.resolution = int(resolution)

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> torch.Tensor:
        """Image `index` as [3, R, R] in [-1, 1]."""
        img = load_rgb(self.pairs[index][0])
        if img.size != (self.resolution, self.resolution):
            img = center_square(img, self.resolution)
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)

    def draw(self, n: int, generator: torch.Generator, flip: bool = False) -> tuple[torch.Tensor, list[str]]:
        """n random (image, caption) pairs, with replacement: ([n, 3, R, R], captions); with `flip`
        each image mirrored left-right with probability 0.5."""
        from ..train.method import random_flips

        idx = torch.randint(0, len(self.pairs), (n,), generator=generator).tolist()
        pixels = torch.stack([self.load(i) for i in idx])
        return random_flips(pixels, generator) if flip else pixels, [self.pairs[i][1] for i in idx]


def load_captioned(owner: str, ctx):
    """The experiment's captioned dataset and the base pipeline, its frozen parts held in the autocast dtype."""
    from ..train.method import MethodError, base_pipeline

    if ctx.data_dir is None:
        raise MethodError(f"{owner}: needs a captioned dataset (experiment data)")
    data = CaptionedImages(ctx.data_dir, ctx.resolution)
    frozen = runtime.precision_dtype(ctx.mixed_precision) or torch.float32
    return data, base_pipeline(ctx, dtype=frozen)


@torch.no_grad()
def encode_batch(vae, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Scaled latents of a pixel batch, drawn from the VAE's distribution with the CPU generator."""
    from ..train.method import encode_latent_distribution, sample_latents

    mean, std = encode_latent_distribution(vae, pixels, next(vae.parameters()).device)
    return sample_latents(mean, std, generator)


def draw_encoded(data: CaptionedImages, encoded, vae, tokenizer, text_encoder, n: int, generator: torch.Generator,
                 flip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """n random (scaled latents, caption embedding) pairs: from `encoded` (an EncodedCaptions) when there is
    one, else drawn from `data` and encoded now; either way the generator gives the same draws."""
    if encoded is not None:
        return encoded.draw(n, generator)
    from ..train.method import encode_prompts

    pixels, captions = data.draw(n, generator, flip)
    latents = encode_batch(vae, pixels, generator)
    return latents, encode_prompts(tokenizer, text_encoder, captions)  # draws nothing


class EncodedCaptions:
    """Every image's latent distribution and every caption's embedding, encoded once.

    For a small captioned set trained for many steps (the study's LoRA: 1,221 Naruto images, 15,000
    steps) each image is encoded once instead of about twelve times, and PNG decoding, the VAE encoder
    and the text encoder leave the training loop. `draw` consumes the generator exactly as
    CaptionedImages.draw followed by encode_batch does (indices, flips, then the latent noise), so each
    step draws the same images and the same noise. With `flip` the mirrored images are encoded as well
    (their latents are at rows N..2N-1). Held on the device: 2 · 4 · (R/8)² fp32 values per image
    (twice that with flip) and 77 × the text width per caption (for SD v1.5 at 512², about 0.37 MB an image).
    """

    @torch.no_grad()
    def __init__(self, data: CaptionedImages, vae, tokenizer, text_encoder, device: torch.device, chunk: int = 8,
                 flip: bool = False):
        from ..train.method import ImageLatents, encode_latent_distribution, encode_prompts

        means, stds, conds, mirrored = [], [], [], []
        for start in range(0, len(data), chunk):  # chunk by chunk: a large set never sits in memory as pixels
            idx = range(start, min(start + chunk, len(data)))
            pixels = torch.stack([data.load(i) for i in idx])
            mean, std = encode_latent_distribution(vae, pixels, device, chunk)
            means.append(mean)
            stds.append(std)
            if flip:
                mirrored.append(encode_latent_distribution(vae, pixels.flip(-1), device, chunk))
            conds.append(encode_prompts(tokenizer, text_encoder, [data.pairs[i][1] for i in idx]))
        means += [m for m, _ in mirrored]
        stds += [s for _, s in mirrored]
        self.cond = torch.cat(conds)
        self.latents = ImageLatents.encoded(torch.cat(means), torch.cat(stds), len(self.cond), flip)

    def __len__(self) -> int:
        return len(self.cond)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.latents.mean, self.latents.std, self.cond))

    def draw(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """n random (latents, caption embedding) pairs, with replacement (mirrored with probability 0.5 with flip)."""
        rows = self.latents.indices(n, generator)
        return self.latents.draw_rows(rows, generator), self.cond[(rows % len(self)).to(self.cond.device)]
