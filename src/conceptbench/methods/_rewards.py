"""Rewards for DDPO, picked by name: each maps decoded images [N, 3, H, W] in [0, 1] (and their
prompts) to one float per image."""

from __future__ import annotations

from pathlib import Path

import torch

from ..train.method import MethodError


def brightness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Mean pixel value: a cheap, obvious reward (tests, sanity runs)."""
    return images.float().mean(dim=(1, 2, 3)).cpu()


class Aesthetic:
    """The LAION improved aesthetic predictor on L2-normalised CLIP image embeddings (as evaluation scores it)."""

    needs = ("clip", "aesthetic")

    def __init__(self, models: dict, device: torch.device, options: dict | None = None):
        from ..metrics.encoders import AestheticScorer, ClipEncoder

        missing = [k for k in self.needs if not models.get(k)]
        if missing:
            raise MethodError(f"ddpo: reward 'aesthetic' needs the model folders {missing} (the train rule's inputs clip and aesthetic)")
        self.clip = ClipEncoder.load(Path(models["clip"]), device, **(options or {}).get("clip", {}))
        self.head = AestheticScorer.load(Path(models["aesthetic"]), device)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from PIL import Image

        arrays = (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        embeds = self.clip.encode_images([Image.fromarray(a) for a in arrays])
        return self.head.score(embeds)


REWARDS = {"aesthetic": Aesthetic, "brightness": lambda models, device, options=None: brightness}


def make_reward(name: str, models: dict, device: torch.device, options: dict | None = None):
    """The reward `name`, its scoring models read from the folders `models` and built as `options` say
    (by role: {"clip": {"quick_gelu": True}}, the train rule's TrainContext.model_options)."""
    if name not in REWARDS:
        raise MethodError(f"ddpo: unknown args.reward {name!r}; known: {sorted(REWARDS)}")
    return REWARDS[name](models, device, options)
