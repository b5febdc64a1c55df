"""The LAION improved aesthetic predictor: an MLP on L2-normalised CLIP ViT-L/14 image embeddings.

Layer layout follows christophschuhmann/improved-aesthetic-predictor (768→1024→128→64→16→1, with
dropout between the first layers), so the real sac+logos+ava1-l14-linearMSE.pth state dict, once
converted to safetensors, loads by name ("layers.0.weight" ... "layers.7.bias").

The LAION head has no activation: it is a linear map of a 768-d embedding. A head may name one in
its config.json ("activation": "gelu"), applied after each hidden linear layer outside the
Sequential, so the weight names stay the same. The toy world's head does: its ground truth rewards
the contrast between object and background, an interaction a linear map of its 64-d CLIP embedding
cannot express (Spearman 0.75 linear, 0.85 with GELU on the same held-out renders).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

LAION_HIDDEN = (1024, 128, 64, 16)
ACTIVATIONS = {None: nn.Identity, "gelu": nn.GELU}


class AestheticMLP(nn.Module):
    def __init__(self, in_dim: int = 768, hidden: tuple[int, ...] = LAION_HIDDEN, activation: str | None = None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"aesthetic head activation {activation!r} is not one of {sorted(map(str, ACTIVATIONS))}")
        self.act = ACTIVATIONS[activation]()
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
        x = embeds
        for layer in self.layers[:-1]:
            x = layer(x)
            if isinstance(layer, nn.Linear):
                x = self.act(x)
        return self.layers[-1](x).squeeze(-1)


def load_aesthetic(path: Path) -> AestheticMLP:
    """Load a head saved as config.json + model.safetensors (see models/hub.py for the conversion)."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    try:
        model = AestheticMLP(in_dim=cfg["in_dim"], hidden=tuple(cfg["hidden"]), activation=cfg.get("activation"))
    except ValueError as e:
        raise ValueError(f"{path / 'config.json'}: {e}") from None
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model.eval()
