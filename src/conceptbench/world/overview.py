"""The toy world at a glance, for the report: what the base model draws, the subjects, the style,
and the quality table of the shipped models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CAPTIONS = [  # combinations of the held-out kind: the base model is asked for what it was never shown
    "a photo of a red dog at the top left on the beach",
    "a photo of a blue car in the center in the snow",
    "a cartoon of a yellow ball at the bottom right at night",
    "a photo of a purple tree on the left on grassy field",
    "a photo of a pink toy at the top in the fog",
    "a photo of an orange box at the bottom left on the beach",
    "a photo of a dog in a bucket",
    "a photo of a toy wearing sunglasses",
]


def _images(folder: Path, n: int) -> list[np.ndarray]:
    from PIL import Image

    files = sorted(Path(folder).glob("*.png"))[:n]
    return [np.asarray(Image.open(f).convert("RGB")) for f in files]


def make_overview(sd_dir, datasets: dict[str, str], out_png, seeds: int = 2) -> None:
    """A figure: the base model's samples of CAPTIONS (one row per seed), then each dataset's first images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(sd_dir), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        imgs = pipe(CAPTIONS, num_inference_steps=30, guidance_scale=5.0, generator=g, output_type="np").images
        rows.append(("base model, seed %d" % seed, [np.clip(np.rint(i * 255), 0, 255).astype(np.uint8) for i in imgs],
                     CAPTIONS if seed == 0 else None))
    for name, folder in datasets.items():
        rows.append((name, _images(Path(folder), len(CAPTIONS)), None))
    cols = len(CAPTIONS)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.6 * cols, 1.75 * len(rows)), squeeze=False)
    for r, (label, imgs, titles) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(imgs):
                ax.imshow(imgs[c], interpolation="nearest")
            if titles:
                ax.set_title(titles[c].replace("a photo of ", "").replace(" at the", "\nat the").replace(" on ", "\non ")
                             .replace(" in the", "\nin the"), fontsize=6)
        axes[r][0].text(-0.1, 0.5, label, transform=axes[r][0].transAxes, ha="right", va="center", fontsize=7)
    fig.suptitle("The toy world: the base model on prompts of held-out kinds, the subjects and the style", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def quality_html(shipped_dir, out_html) -> None:
    """The shipped models' quality table (measured by `python -m conceptbench.world.quality` at build time)."""
    from .quality import BARS

    path = Path(shipped_dir) / "quality.json"
    if not path.exists():
        Path(out_html).write_text(f"<html><body><p>{path} is missing: these models were exported without "
                                  "being measured (`make world` measures them).</p></body></html>")
        return
    res = json.loads(path.read_text())
    rows = "".join(
        f"<tr><td>{k}</td><td>{v:.3f}</td><td>{'' if k not in BARS else ('≥ %.2f: %s' % (BARS[k], 'met' if v >= BARS[k] else 'not met'))}</td></tr>"
        for k, v in res.items())
    Path(out_html).write_text(
        "<html><body><h3>The toy world's models, measured on held-out combinations</h3>"
        "<p>oracle clean: the oracle on clean renders; vae: the oracle on the autoencoder's reconstructions; "
        "base: the oracle on the base model's samples of held-out captions (30 DDIM steps, guidance 5); "
        "clip, dino, aesthetic: the scoring models.</p>"
        f"<table border=1 cellpadding=3><tr><th>measure</th><th>value</th><th>bar</th></tr>{rows}</table></body></html>")
