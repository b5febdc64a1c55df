"""The LAION improved aesthetic predictor: an MLP on L2-normalised CLIP ViT-L/14 image embeddings.

Layer layout follows christophschuhmann/improved-aesthetic-predictor (768→1024→128→64→16→1, with
dropout between the first layers), so the real sac+logos+ava1-l14-linearMSE.pth state dict, once
converted to safetensors, loads by name ("layers.0.weight" ... "layers.7.bias").
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

LAION_HIDDEN = (1024, 128, 64, 16)


class AestheticMLP(nn.Module):
    def __init__(self, in_dim: int = 768, hidden: tuple[int, ...] = LAION_HIDDEN):
        super().__init__()
        h1, h2, h3, h4 = hidden
        self.layers = nn.Sequential(
            nn.Linear(in_dim, h1),
            nn.Dropout(0.2),
            nn.Linear(h1, h2),
            nn.Dropout(0.2),
            nn.Linear(h2, h3),
            nn.Dropout(0.1),
            nn.Linear(h3, h4),
            nn.Linear(h4, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        """Score L2-normalised image embeddings; returns one score per row."""
        return self.layers(embeds).squeeze(-1)


def load_aesthetic(path: Path) -> AestheticMLP:
    """Load a head saved as config.json + model.safetensors (see models/hub.py for the conversion)."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    model = AestheticMLP(in_dim=cfg["in_dim"], hidden=tuple(cfg["hidden"]))
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model.eval()
