"""Shared fixtures: a tiny SD pipeline folder and small instance/class image folders (64x64 PNGs)."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from PIL import Image

RESOLUTION = 64

DREAMBOOTH_SPEC = {
    "experiment": "dreambooth",
    "variant": "lambda-0.25",
    "method": "dreambooth",
    "seed": 0,
    "resolution": RESOLUTION,
    "train": {"steps": 4, "learning_rate": 1e-4, "batch_size": 1, "checkpoint_every": 2, "log_every": 1},
    "args": {
        "instance_prompt": "a photo of sks cat",
        "class_prompt": "a photo of a cat",
        "prior_loss_weight": 0.25,
        "train_text_encoder": False,
    },
}


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A tiny StableDiffusionPipeline saved to disk (built once per test session)."""
    from conceptbench.models.tiny import build_tiny_pipeline

    out = tmp_path_factory.mktemp("models") / "tiny-sd"
    build_tiny_pipeline(out, seed=0)
    return out


def _crops(folder, image: np.ndarray, n: int, start: int) -> None:
    folder.mkdir(parents=True)
    side = 128
    for i in range(n):
        y, x = 20 * i, start + 37 * i
        crop = Image.fromarray(image[y : y + side, x : x + side]).resize((RESOLUTION, RESOLUTION))
        crop.save(folder / f"{i:03d}.png")


@pytest.fixture(scope="session")
def instance_dir(tmp_path_factory):
    """Three 64x64 crops of skimage's chelsea (the 'subject'), with captions in metadata.jsonl."""
    import skimage.data

    folder = tmp_path_factory.mktemp("data") / "instance"
    _crops(folder, skimage.data.chelsea(), 3, start=60)
    lines = [f'{{"file_name": "{i:03d}.png", "text": "a cat, crop {i}"}}\n' for i in range(3)]
    (folder / "metadata.jsonl").write_text("".join(lines))
    return folder


@pytest.fixture(scope="session")
def class_dir(tmp_path_factory):
    """Four 64x64 crops from another part of chelsea, standing in for generated class images."""
    import skimage.data

    folder = tmp_path_factory.mktemp("data") / "class"
    _crops(folder, skimage.data.chelsea(), 4, start=180)
    return folder


@pytest.fixture
def dreambooth_spec():
    """A fresh, mutable copy of a short DreamBooth spec."""
    return copy.deepcopy(DREAMBOOTH_SPEC)


@pytest.fixture(scope="session")
def caption_dir(tmp_path_factory):
    """Four 64x64 captioned images, in the layout prepare_dataset writes."""
    folder = tmp_path_factory.mktemp("captions")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i:06d}.png")
        rows.append(f'{{"file_name": "{i:06d}.png", "text": "a drawing number {i}"}}')
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def overfit_losses(method, ctx, optimizer, lr: float, steps: int) -> list[float]:
    """Set the method up, draw one batch, and fit it `steps` times; the losses, in order."""
    import torch

    method.setup(ctx)
    g = torch.Generator().manual_seed(0)
    batch = method.batch(0, g)
    opt = optimizer(method.param_groups(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = method.loss(batch, g)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.fixture
def overfit():
    """overfit_losses, for the methods' "loss falls on a fixed batch" tests."""
    return overfit_losses
