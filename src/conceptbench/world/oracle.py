"""The oracle: reads back from a toy-world image what was drawn.

Background, object colour and position are read analytically (exact on clean renders): the
background is the commonest palette colour on the border; object pixels are those far from it, and
each votes for its nearest object colour; the position is the grid cell of the winning colour's
centroid. Shape, subject, style and accessory come from a small CNN trained on clean renders, the
autoencoder's reconstructions of them (what a generated image is) and impostors of the subjects
(`build.py`, stage `oracle`), saved as safetensors with its label lists.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import scene as sc

_BG = np.array(list(sc.BACKGROUNDS.values()), np.float32)
_BG_NAMES = list(sc.BACKGROUNDS)
# Every colour an object pixel can have; only the first len(COLOURS) are object colours.
_OBJ_NAMES = list(sc.COLOURS) + [f"subject:{k}" for k in sc.SUBJECTS]
_OBJ = np.array(list(sc.COLOURS.values()) + [s["body"] for s in sc.SUBJECTS.values()], np.float32)
_OTHER = np.array([c for _, c in sc.ACCESSORIES.values()] + [sc.OUTLINE, (255, 120, 0)]
                  + [s["mark"] for s in sc.SUBJECTS.values()], np.float32)
FAR_FROM_BACKGROUND = 60.0  # RGB distance: a pixel this far from the background colour is not background
NEAR_PALETTE = 70.0  # and votes for a palette colour only when it is this close to it
MIN_VOTES = 6  # pixels of one colour needed to call an object there

HEADS = {
    "shape": list(sc.CLASSES),
    "subject": ["none", *sc.SUBJECTS],
    "style": list(sc.STYLES),
    "accessory": ["none", *sc.ACCESSORIES],
}


def _nearest(pixels: np.ndarray, palette: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = np.linalg.norm(pixels[:, None, :] - palette[None, :, :], axis=-1)
    return d.argmin(1), d.min(1)


def _shade_distance(pixels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Distance of each pixel to each palette colour or a darker shade of it (hatching), N x K."""
    s = np.clip(pixels @ palette.T / (palette * palette).sum(1), 0.4, 1.0)  # N x K
    return np.linalg.norm(pixels[:, None, :] - s[:, :, None] * palette[None], axis=-1)


def read_background(img: np.ndarray) -> str:
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]]).astype(np.float32)
    idx = _shade_distance(border, _BG).argmin(1)
    return _BG_NAMES[np.bincount(idx, minlength=len(_BG)).argmax()]


def read_object(img: np.ndarray) -> dict:
    """{'background', 'colour', 'position', 'votes'} of one image (H x W x 3 uint8)."""
    img = np.asarray(img)
    background = read_background(img)
    px = img.reshape(-1, 3).astype(np.float32)
    bg = np.array(sc.BACKGROUNDS[background], np.float32)
    # Not background, and not one of its hatching shades.
    candidate = _shade_distance(px, bg[None])[:, 0] > FAR_FROM_BACKGROUND
    idx, dist = _nearest(px, _OBJ)
    _, other = _nearest(px, _OTHER)
    votes = candidate & (dist < NEAR_PALETTE) & (dist < other)
    counts = np.bincount(idx[votes], minlength=len(_OBJ))
    out = {"background": background, "colour": None, "position": None, "votes": int(counts.max())}
    if counts.max() < MIN_VOTES:
        return out
    best = int(counts.argmax())
    out["colour"] = _OBJ_NAMES[best]
    ys, xs = np.nonzero((votes & (idx == best)).reshape(img.shape[:2]))
    scale = sc.SIZE / img.shape[0]
    out["position"] = sc.POSITIONS[sc.cell_of((xs.mean() + 0.5) * scale, (ys.mean() + 0.5) * scale)]
    return out


# --- the learned part --------------------------------------------------------------------------


def make_cnn():
    import torch.nn as nn

    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                             nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())

    class OracleNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(block(3, 32), nn.MaxPool2d(2), block(32, 64), nn.MaxPool2d(2),
                                      block(64, 96), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.heads = nn.ModuleDict({k: nn.Linear(96, len(v)) for k, v in HEADS.items()})

        def forward(self, x):
            h = self.body(x)
            return {k: head(h) for k, head in self.heads.items()}

    return OracleNet()


def labels(scene: sc.Scene) -> dict[str, int]:
    t = scene.things[0]
    return {
        "shape": HEADS["shape"].index(t.cls),
        "subject": HEADS["subject"].index(t.subject or "none"),
        "style": HEADS["style"].index(scene.style),
        "accessory": HEADS["accessory"].index(scene.accessory or "none"),
    }


def training_scene(rng: np.random.Generator) -> sc.Scene:
    """Single-object renders of everything the oracle must tell apart, subjects and styles included."""
    u = rng.random()
    subject = str(rng.choice(list(sc.SUBJECTS))) if u < 0.3 else None
    style = str(rng.choice(list(sc.STYLES)))
    return sc.sample_scene(rng, subject=subject, style=style, pair_p=0.0, accessory_p=0.4)


def impostor_scene(rng: np.random.Generator) -> sc.Scene:
    """An object of another class in a subject's colours and marking (a lime ball with a magenta heart):
    not the subject. Without these the oracle learned a subject's colour alone, and called any lime blob
    the cat toy."""
    subject = str(rng.choice(list(sc.SUBJECTS)))
    spec = sc.SUBJECTS[subject]
    s = sc.sample_scene(rng, style=str(rng.choice(list(sc.STYLES))), pair_p=0.0, accessory_p=0.4)
    t = s.things[0]
    t.cls = str(rng.choice([c for c in sc.CLASSES if c != spec["cls"]]))
    t.colour, t.mark, t.marking = spec["body"], spec["mark"], spec["marking"]
    if not sc.can_wear(t.cls, s.accessory):
        s.accessory = None  # as in the base world
    return s


class Oracle:
    """Reads images: analytic background, colour and position; the CNN's shape, subject, style, accessory."""

    def __init__(self, net, device="cpu"):
        self.net, self.device = net.eval().to(device), device

    @classmethod
    def load(cls, folder: str | Path, device="cpu") -> "Oracle":
        from safetensors.torch import load_file

        folder = Path(folder)
        meta = json.loads((folder / "config.json").read_text())
        if meta.get("heads") != HEADS:
            raise ValueError(f"{folder}/config.json: oracle labels {meta.get('heads')} differ from this world's {HEADS}")
        net = make_cnn()
        net.load_state_dict(load_file(str(folder / "model.safetensors")))
        return cls(net, device)

    def save(self, folder: Path, report: dict) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"heads": HEADS, "clean_accuracy": report}, indent=2))

    def read(self, images: list[np.ndarray], batch_size: int = 256) -> list[dict]:
        import torch

        from .data import to_tensor

        rows = [read_object(im) for im in images]
        arr = np.stack([np.asarray(im) for im in images])
        if arr.shape[1] != sc.SIZE:
            from PIL import Image

            arr = np.stack([np.asarray(Image.fromarray(a).resize((sc.SIZE, sc.SIZE), Image.BILINEAR)) for a in arr])
        with torch.inference_mode():
            for start in range(0, len(arr), batch_size):
                out = self.net(to_tensor(arr[start : start + batch_size]).to(self.device))
                for head, logits in out.items():
                    for i, k in enumerate(logits.argmax(1).tolist()):
                        rows[start + i][head] = HEADS[head][k]
        return rows


ATTRIBUTES = ("background", "colour", "position", "shape", "accessory")


def score_images(oracle: "Oracle", images: list[np.ndarray], prompts: list[str], subject: str | None) -> dict:
    """Per-image oracle columns for the evaluation table.

    oracle_<attribute>: 1 when the image shows what its prompt names (NaN where the prompt does not name
    it); oracle_prompt: the share of what the prompt names that the image shows (NaN where it names none of
    them); oracle_subject: 1 when `subject` is the one drawn (NaN without a subject); oracle_ninja: 1 when
    the image is drawn in the held-out ninja style; true_aesthetic: the world's aesthetic formula applied
    to what the oracle measures in the image (colours, place, size).
    """
    reads = oracle.read(images)
    out = {f"oracle_{a}": np.full(len(images), np.nan) for a in ATTRIBUTES}
    for i, (read, prompt) in enumerate(zip(reads, prompts)):
        asked = sc.parse_prompt(prompt)
        for a in ATTRIBUTES:
            if a in asked:
                out[f"oracle_{a}"][i] = float(read.get(a) == asked[a])
    named = np.stack([out[f"oracle_{a}"] for a in ATTRIBUTES], axis=1)
    asked_any = np.isfinite(named).any(axis=1)
    out["oracle_prompt"] = np.full(len(images), np.nan)
    out["oracle_prompt"][asked_any] = np.nanmean(named[asked_any], axis=1)
    out["oracle_subject"] = np.array([float(r["subject"] == subject) if subject else np.nan for r in reads])
    out["oracle_ninja"] = np.array([float(r["style"] == "ninja") for r in reads])
    out["true_aesthetic"] = np.array([measured_aesthetic(im, r) for im, r in zip(images, reads)])
    return out


def measured_aesthetic(img: np.ndarray, read: dict) -> float:
    """The world's aesthetic formula on what can be measured in the image; 1 (the floor) with no object."""
    if read.get("colour") is None:
        return 1.0
    name = read["colour"]
    colour = sc.COLOURS[name] if name in sc.COLOURS else sc.SUBJECTS[name.split(":", 1)[1]]["body"]
    img = np.asarray(img)
    px = img.reshape(-1, 3).astype(np.float32)
    mask = (np.linalg.norm(px - np.array(colour, np.float32), axis=1) < NEAR_PALETTE).reshape(img.shape[:2])
    ys, xs = np.nonzero(mask)
    scale = sc.SIZE / img.shape[0]
    cx, cy = (xs.mean() + 0.5) * scale, (ys.mean() + 0.5) * scale
    radius = float(np.sqrt(mask.sum() * scale * scale / np.pi))  # the radius of a disc of that area
    scene = sc.Scene([sc.Thing(read.get("shape") or "ball", name if name in sc.COLOURS else None,
                               None if name in sc.COLOURS else name.split(":", 1)[1], radius, cx, cy)],
                     read["background"], read.get("style") or "photo",
                     None if read.get("accessory") in (None, "none") else read["accessory"])
    return sc.aesthetic(scene)


def truth(scene: sc.Scene) -> dict:
    """What the oracle should read from a clean render of `scene` (single-object scenes)."""
    t = scene.things[0]
    return {
        "background": scene.background,
        "colour": t.colour if t.subject is None else f"subject:{t.subject}",
        "position": sc.POSITIONS[t.cell],
        "shape": t.cls,
        "subject": t.subject or "none",
        "style": scene.style,
        "accessory": scene.accessory or "none",
    }


def accuracy(reads: list[dict], truths: list[dict], keys=None) -> dict[str, float]:
    keys = keys or list(truths[0])
    return {k: float(np.mean([r.get(k) == t[k] for r, t in zip(reads, truths)])) for k in keys}
