"""The scoring models, each loaded once per job: CLIP (open_clip), DINOv2 (transformers) and the
LAION aesthetic head on CLIP image embeddings.

Every `encode_*` method batches its input, runs under `torch.inference_mode` and returns
L2-normalised float32 rows on the CPU, so the pure functions in `scores.py` can use them directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from .aesthetic import AestheticMLP, load_aesthetic

# The weight files open_clip's 'local-dir:' loader looks for (open_clip.factory._find_checkpoint_in_dir).
OPEN_CLIP_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pth")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _batched(items: Sequence, batch_size: int, encode: Callable[[Sequence], torch.Tensor]) -> torch.Tensor:
    """Encode `items` in batches and stack the L2-normalised rows (float32, CPU)."""
    if len(items) == 0:
        raise ValueError("nothing to encode: got an empty list")
    out = []
    with torch.inference_mode():
        for start in range(0, len(items), batch_size):
            feats = encode(items[start : start + batch_size]).float()
            out.append(torch.nn.functional.normalize(feats, dim=-1).cpu())
    return torch.cat(out)


def _rgb(images: Sequence[Image.Image]) -> list[Image.Image]:
    return [im if im.mode == "RGB" else im.convert("RGB") for im in images]


class ClipEncoder:
    """An open_clip CLIP read from a folder with open_clip_config.json and a weights file."""

    def __init__(self, model, preprocess, tokenizer, device: torch.device, batch_size: int = 32):
        self.model, self.preprocess, self.tokenizer = model.eval(), preprocess, tokenizer
        self.device, self.batch_size = device, batch_size

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None, batch_size: int = 32,
             quick_gelu: bool | None = None) -> "ClipEncoder":
        """Load with open_clip's 'local-dir:' schema, refusing a folder without weights.

        open_clip itself only logs a warning and returns a randomly initialised model there.
        `quick_gelu` (the model entry's key, `clip_options`) sets the activation; None leaves it to the
        folder's open_clip_config.json. 'local-dir:' reads only that file, not open_clip's pretrained table,
        which marks OpenAI's weights (trained with QuickGELU) `quick_gelu: True`; the hub folder of
        timm/vit_large_patch14_clip_224.openai does not say it, so without the key they run with GELU.
        """
        import open_clip

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"open_clip model folder not found: {path}")
        if not any(any(path.glob(g)) for g in OPEN_CLIP_WEIGHT_GLOBS):
            raise FileNotFoundError(
                f"open_clip model folder {path} has no weights file ({', '.join(OPEN_CLIP_WEIGHT_GLOBS)}); "
                "open_clip would silently use random weights"
            )
        device = torch.device(device) if device is not None else default_device()
        name = f"local-dir:{path}"
        activation = {} if quick_gelu is None else {"quick_gelu": bool(quick_gelu)}  # open_clip's last override
        model, _, preprocess = open_clip.create_model_and_transforms(name, device=device, **activation)
        return cls(model, preprocess, open_clip.get_tokenizer(name), device, batch_size)

    @property
    def dim(self) -> int:
        return int(self.model.visual.output_dim)

    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """[N, D] unit-norm image embeddings."""

        def encode(batch):
            pixels = torch.stack([self.preprocess(im) for im in _rgb(batch)]).to(self.device)
            return self.model.encode_image(pixels)

        return _batched(images, self.batch_size, encode)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """[N, D] unit-norm text embeddings, tokenised by the model's own open_clip tokenizer."""

        def encode(batch):
            return self.model.encode_text(self.tokenizer(list(batch)).to(self.device))

        return _batched(texts, self.batch_size, encode)


class DinoEncoder:
    """A DINOv2 (transformers) read with AutoModel/AutoImageProcessor; features are the CLS token."""

    def __init__(self, model, processor, device: torch.device, batch_size: int = 32):
        self.model, self.processor = model.eval(), processor
        self.device, self.batch_size = device, batch_size

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None, batch_size: int = 32) -> "DinoEncoder":
        from transformers import AutoImageProcessor, AutoModel

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"DINOv2 model folder not found: {path}")
        device = torch.device(device) if device is not None else default_device()
        model = AutoModel.from_pretrained(str(path)).to(device)
        return cls(model, AutoImageProcessor.from_pretrained(str(path)), device, batch_size)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """[N, D] unit-norm pooler_output (Dinov2Model's layer-normed CLS token)."""

        def encode(batch):
            pixels = self.processor(images=_rgb(batch), return_tensors="pt")["pixel_values"]
            return self.model(pixel_values=pixels.to(self.device)).pooler_output

        return _batched(images, self.batch_size, encode)


class AestheticScorer:
    """The LAION aesthetic head applied to L2-normalised CLIP image embeddings."""

    def __init__(self, head: AestheticMLP, device: torch.device):
        self.head, self.device = head.eval().to(device), device

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> "AestheticScorer":
        device = torch.device(device) if device is not None else default_device()
        return cls(load_aesthetic(Path(path)), device)

    @property
    def in_dim(self) -> int:
        return int(self.head.layers[0].in_features)

    def score(self, clip_image_embeds: torch.Tensor) -> torch.Tensor:
        """One score per row; rows are (re-)normalised, as the LAION predictor expects."""
        if clip_image_embeds.shape[-1] != self.in_dim:
            raise ValueError(
                f"aesthetic head expects {self.in_dim}-d CLIP embeddings, got {clip_image_embeds.shape[-1]}-d: "
                "pair it with the CLIP model it was trained on"
            )
        with torch.inference_mode():
            embeds = torch.nn.functional.normalize(clip_image_embeds.float(), dim=-1).to(self.device)
            return self.head(embeds).float().cpu()
