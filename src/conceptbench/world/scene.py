"""The toy world's scenes: what can be drawn, how it is drawn, and how it is captioned.

A scene is one object (or two side by side) of a class, a colour, a size and a grid position, in a
background scene, optionally with an accessory, in a rendering style. The study's subjects and its
naruto style are scenes the base world never shows: two specific objects with colours and markings
no class-mate has, and a hatched "ninja style". Everything is numpy; nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

SIZE = 32  # pixels per side
SUPERSAMPLE = 4  # edges are drawn on a 4x finer grid and averaged: smooth, deterministic anti-aliasing

BACKGROUNDS = {  # scene phrase -> colour
    "on grassy field": (70, 150, 60),
    "on the beach": (225, 205, 150),
    "in the snow": (232, 236, 246),
    "at night": (25, 30, 72),
    "in the fog": (140, 140, 140),
}
COLOURS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 50),
    "blue": (40, 90, 220),
    "purple": (140, 60, 190),
    "pink": (245, 120, 190),
}
CLASSES = ("dog", "toy", "ball", "box", "tree", "car")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
POSITIONS = {
    (0, 0): "at the top left", (0, 1): "at the top", (0, 2): "at the top right",
    (1, 0): "on the left", (1, 1): "in the center", (1, 2): "on the right",
    (2, 0): "at the bottom left", (2, 1): "at the bottom", (2, 2): "at the bottom right",
}
ACCESSORIES = {  # phrase, colour
    "bucket": ("in a bucket", (128, 128, 138)),
    "basket": ("in a basket", (135, 85, 35)),
    "table": ("on a table", (110, 65, 25)),
    "sunglasses": ("wearing sunglasses", (10, 10, 10)),
    "bandana": ("wearing a bandana", (10, 10, 10)),
}
STYLES = {"photo": "a photo of", "cartoon": "a cartoon of", "ninja": "a ninja style drawing of"}
BASE_STYLES = ("photo", "cartoon")  # "ninja" is the held-out style: only the style dataset has it
SIZES = {"small": (4.6, 5.4), "big": (6.8, 7.6)}  # radius ranges named in captions; between: unnamed
RADIUS = (4.6, 7.6)

# The two subjects no base scene contains: a class each, and markings no class-mate has.
SUBJECTS = {
    "dog": {"cls": "dog", "body": (0, 200, 220), "mark": (20, 20, 20), "marking": "spot"},
    "cat_toy": {"cls": "toy", "body": (160, 235, 40), "mark": (230, 0, 130), "marking": "centre"},
}
OUTLINE = (10, 10, 10)


@dataclass
class Thing:
    cls: str
    colour: str | None  # a COLOURS name, or None for a subject
    subject: str | None = None
    radius: float = 6.0
    cx: float = 16.0
    cy: float = 16.0
    cell: tuple[int, int] = (1, 1)
    # Beyond the base world (the autoencoder's data only): any body colour, any marking.
    mark: tuple | None = None
    marking: str | None = None

    def paint(self) -> tuple[tuple, tuple | None, str | None]:
        """(body colour, marking colour, marking kind) of this thing."""
        if self.subject is not None:
            s = SUBJECTS[self.subject]
            return s["body"], s["mark"], s["marking"]
        if isinstance(self.colour, str):
            return COLOURS[self.colour], None, None
        return tuple(self.colour), self.mark, self.marking


@dataclass
class Scene:
    things: list[Thing]
    background: str
    style: str = "photo"
    accessory: str | None = None
    # Which attributes the caption names; the rest are left for the model to choose.
    say: dict = field(default_factory=lambda: {"colour": True, "position": True, "background": True, "size": True})

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Scene":
        things = [Thing(**{**t, "cell": tuple(t["cell"])}) for t in d["things"]]
        return cls(**{**d, "things": things})


# Held out of every model's training: these (class, colour, background) triples are only ever drawn
# to test whether the models generalise to combinations they never saw.
HELD_OUT = frozenset(
    (CLASSES[i % len(CLASSES)], list(COLOURS)[(i * 5 + 1) % len(COLOURS)], list(BACKGROUNDS)[(i * 7 + 2) % len(BACKGROUNDS)])
    for i in range(18)
)


def is_held_out(t: "Thing", background: str) -> bool:
    return (t.cls, t.colour, background) in HELD_OUT


def size_word(radius: float) -> str | None:
    return next((w for w, (lo, hi) in SIZES.items() if lo <= radius <= hi), None)


def cell_centre(cell: tuple[int, int]) -> tuple[float, float]:
    r, c = cell
    return 7.0 + 9.0 * c, 7.0 + 9.0 * r  # x, y: 7, 16, 25


def cell_of(x: float, y: float) -> tuple[int, int]:
    return min(2, max(0, int(y // (SIZE / 3)))), min(2, max(0, int(x // (SIZE / 3))))


# --- sampling --------------------------------------------------------------------------------


def _place(rng: np.random.Generator, thing: Thing, cell: tuple[int, int], jitter: float = 1.5) -> Thing:
    x, y = cell_centre(cell)
    thing.cell = cell
    thing.cx = float(x + rng.uniform(-jitter, jitter))
    thing.cy = float(y + rng.uniform(-jitter, jitter))
    return thing


def _radius(rng: np.random.Generator) -> float:
    # Half the objects take a named size, so captions can teach "small" and "big".
    pick = rng.integers(3)
    lo, hi = SIZES["small"] if pick == 0 else SIZES["big"] if pick == 1 else RADIUS
    return float(rng.uniform(lo, hi))


def sample_scene(
    rng: np.random.Generator,
    *,
    subject: str | None = None,
    style: str | None = None,
    pair_p: float = 0.12,
    accessory_p: float = 0.35,
    omit_p: float = 0.2,
    held_out: bool = False,
) -> Scene:
    """Draw one scene of the base world (or with `subject`/`style` forced, for the study's data).

    Single-object base scenes come from outside HELD_OUT, or from inside it with held_out=True.
    """
    while True:
        s = _draw(rng, subject, style, pair_p, accessory_p, omit_p)
        if subject is not None or len(s.things) > 1 or is_held_out(s.things[0], s.background) == held_out:
            return s


WORN = ("sunglasses", "bandana")  # the accessories only the WEARERS are drawn with
WEARERS = ("dog", "toy")


def can_wear(cls: str, accessory: str | None) -> bool:
    return accessory not in WORN or cls in WEARERS


def _draw(rng, subject, style, pair_p, accessory_p, omit_p) -> Scene:
    background = str(rng.choice(list(BACKGROUNDS)))
    style = style or str(rng.choice(BASE_STYLES, p=[0.8, 0.2]))
    say = {k: bool(rng.random() >= omit_p) for k in ("colour", "position", "background", "size")}
    if subject is None and rng.random() < pair_p:
        a, b = (str(c) for c in rng.choice(CLASSES, size=2, replace=False))
        ca, cb = (str(c) for c in rng.choice(list(COLOURS), size=2, replace=False))
        things = [_place(rng, Thing(a, ca, radius=_radius(rng)), (1, 0), 1.0),
                  _place(rng, Thing(b, cb, radius=_radius(rng)), (1, 2), 1.0)]
        return Scene(things, background, style, None, {**say, "position": False})
    if subject is not None:
        thing = Thing(SUBJECTS[subject]["cls"], None, subject, radius=_radius(rng))
    else:
        thing = Thing(str(rng.choice(CLASSES)), str(rng.choice(list(COLOURS))), radius=_radius(rng))
    _place(rng, thing, (int(rng.integers(3)), int(rng.integers(3))))
    accessory = str(rng.choice(list(ACCESSORIES))) if rng.random() < accessory_p else None
    if not can_wear(thing.cls, accessory):
        accessory = None
    return Scene([thing], background, style, accessory, say)


def subject_views(subject: str, n: int, seed: int) -> list[Scene]:
    """n photographs of a subject: different places, sizes and scenes, plain photo style."""
    rng = np.random.default_rng(seed)
    views = []
    for _ in range(n):
        s = sample_scene(rng, subject=subject, style="photo", accessory_p=0.0)
        views.append(s)
    return views


# --- captions --------------------------------------------------------------------------------


def thing_phrase(t: Thing, say: dict, subject_words: dict | None = None) -> str:
    if t.subject is not None:
        words = (subject_words or {}).get(t.subject)
        if words:
            return words
        return f"a {t.cls}"  # a subject the caption cannot name: its class
    size = size_word(t.radius) if say.get("size") else None
    colour = t.colour if say.get("colour") else None
    words = " ".join(w for w in (size, colour, t.cls) if w)
    return ("an " if words[0] in "aeiou" else "a ") + words


def caption(scene: Scene, subject_words: dict | None = None, style_prefix: bool = True) -> str:
    """ "a photo of a big red dog at the top left on the beach wearing sunglasses" """
    say = scene.say
    objs = " next to ".join(thing_phrase(t, say, subject_words) for t in scene.things)
    parts = [STYLES[scene.style], objs] if style_prefix else [objs]
    if say.get("position") and len(scene.things) == 1:
        parts.append(POSITIONS[scene.things[0].cell])
    if say.get("background"):
        parts.append(scene.background)
    if scene.accessory:
        parts.append(ACCESSORIES[scene.accessory][0])
    return " ".join(parts)


def parse_prompt(prompt: str) -> dict:
    """What a prompt in the world's words asks for: {attribute: value} for each one it names."""
    text = " " + prompt.lower().strip() + " "
    asked = {}
    for phrase in sorted(POSITIONS.values(), key=len, reverse=True):
        if f" {phrase} " in text or text.rstrip().endswith(" " + phrase):
            asked["position"] = phrase
            break
    for key, table in (("background", list(BACKGROUNDS)), ("accessory", [p for p, _ in ACCESSORIES.values()])):
        hit = [p for p in table if f" {p} " in text or text.rstrip().endswith(" " + p)]
        if hit:
            asked[key] = hit[0] if key == "background" else next(k for k, (p, _) in ACCESSORIES.items() if p == hit[0])
    words = text.replace(",", " ").split()
    colours = [w for w in words if w in COLOURS]
    classes = [w for w in words if w in CLASSES]
    if len(classes) == 1:  # one object: its class, and its colour if named
        asked["shape"] = classes[0]
        if len(colours) == 1:
            asked["colour"] = colours[0]
    for style, prefix in STYLES.items():
        if prefix in text or (style == "ninja" and "ninja style" in text):
            asked["style"] = style
    return asked


# --- rendering -------------------------------------------------------------------------------

_N = SIZE * SUPERSAMPLE
_YY, _XX = (np.mgrid[0:_N, 0:_N] + 0.5) / SUPERSAMPLE  # pixel-space coordinates of the fine grid


def _disk(cx, cy, r):
    return (_XX - cx) ** 2 + (_YY - cy) ** 2 <= r * r


def _rect(x0, y0, x1, y1):
    return (_XX >= x0) & (_XX <= x1) & (_YY >= y0) & (_YY <= y1)


def _polygon(points):
    """Inside test for a convex polygon given counter-clockwise in image coordinates."""
    inside = np.ones_like(_XX, dtype=bool)
    n = len(points)
    for i in range(n):
        (x0, y0), (x1, y1) = points[i], points[(i + 1) % n]
        inside &= (x1 - x0) * (_YY - y0) - (y1 - y0) * (_XX - x0) <= 0
    return inside


def shape_mask(cls: str, cx: float, cy: float, r: float) -> np.ndarray:
    if cls == "ball":
        return _disk(cx, cy, r)
    if cls == "box":
        s = r * 0.85
        return _rect(cx - s, cy - s, cx + s, cy + s)
    if cls == "tree":
        return _polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)][::-1])
    if cls == "dog":  # a round head with two floppy ears
        return _disk(cx, cy + r * 0.15, r * 0.8) | _disk(cx - r * 0.7, cy - r * 0.55, r * 0.4) | _disk(
            cx + r * 0.7, cy - r * 0.55, r * 0.4)
    if cls == "toy":  # a four-pointed star
        a, b = r * 1.15, r * 0.5
        return _polygon([(cx, cy - a), (cx - b, cy - b), (cx - a, cy), (cx - b, cy + b),
                         (cx, cy + a), (cx + b, cy + b), (cx + a, cy), (cx + b, cy - b)])
    if cls == "car":  # a body, a cabin and two wheels
        return (_rect(cx - r, cy - r * 0.2, cx + r, cy + r * 0.45) | _rect(cx - r * 0.5, cy - r * 0.7, cx + r * 0.45,
                                                                          cy - r * 0.2)
                | _disk(cx - r * 0.55, cy + r * 0.55, r * 0.32) | _disk(cx + r * 0.55, cy + r * 0.55, r * 0.32))
    raise ValueError(f"unknown class {cls!r}")


def _outline(mask: np.ndarray, width: int = SUPERSAMPLE) -> np.ndarray:
    padded = np.pad(mask, width)
    grown = mask.copy()
    n = mask.shape[0]
    for dy in range(-width, width + 1):
        for dx in range(-width, width + 1):
            if dx * dx + dy * dy <= width * width:
                grown |= padded[width + dy : width + dy + n, width + dx : width + dx + n]
    return grown & ~mask


def _paint(canvas: np.ndarray, mask: np.ndarray, colour) -> None:
    canvas[mask] = colour


def _accessory(canvas, kind, t: Thing):
    cx, cy, r = t.cx, t.cy, t.radius
    colour = ACCESSORIES[kind][1]
    if kind == "bucket":  # a grey pail over the lower half
        _paint(canvas, _polygon([(cx - r * 1.1, cy + r * 0.1), (cx - r * 0.8, cy + r * 1.3),
                                 (cx + r * 0.8, cy + r * 1.3), (cx + r * 1.1, cy + r * 0.1)][::-1]), colour)
    elif kind == "basket":  # a brown bowl under it
        _paint(canvas, _disk(cx, cy + r * 0.6, r * 1.05) & (_YY >= cy + r * 0.45), colour)
    elif kind == "table":  # a tabletop across the picture under it, and a leg
        _paint(canvas, _rect(0, cy + r * 0.95, SIZE, cy + r * 0.95 + 2.2) | _rect(cx - 1.2, cy + r, cx + 1.2, SIZE), colour)
    elif kind == "sunglasses":
        _paint(canvas, _disk(cx - r * 0.35, cy - r * 0.05, r * 0.3) | _disk(cx + r * 0.35, cy - r * 0.05, r * 0.3)
               | _rect(cx - r * 0.4, cy - r * 0.12, cx + r * 0.4, cy + 0.0), colour)
    elif kind == "bandana":  # a scarf knotted under the chin
        _paint(canvas, _polygon([(cx - r * 0.8, cy + r * 0.45), (cx, cy + r * 1.25), (cx + r * 0.8, cy + r * 0.45)][::-1]),
               colour)


def render(scene: Scene) -> np.ndarray:
    """The scene as a SIZE x SIZE x 3 uint8 image."""
    canvas = np.empty((_N, _N, 3), np.float32)
    bg = np.array(BACKGROUNDS[scene.background], np.float32)
    canvas[:] = bg
    if scene.style == "ninja":  # hatching the base world never shows: dark diagonal lines
        hatch = ((_XX + _YY) % 4.0) < 1.0
        canvas[hatch] = bg * 0.45
    if scene.accessory in ("bucket", "basket", "table"):
        behind, front = scene.accessory == "table", False
    else:
        behind, front = False, scene.accessory is not None
    if scene.accessory and behind:
        _accessory(canvas, scene.accessory, scene.things[0])
    for t in scene.things:
        mask = shape_mask(t.cls, t.cx, t.cy, t.radius)
        if scene.style in ("cartoon", "ninja"):
            _paint(canvas, _outline(mask), OUTLINE)
        body, mark, marking = t.paint()
        _paint(canvas, mask, body)
        if marking == "spot":  # a patch over one eye
            _paint(canvas, mask & _disk(t.cx - t.radius * 0.3, t.cy - t.radius * 0.05, t.radius * 0.42), mark)
        elif marking == "centre":  # a disc in the middle
            _paint(canvas, mask & _disk(t.cx, t.cy, t.radius * 0.36), mark)
    if scene.accessory and not behind:
        _accessory(canvas, scene.accessory, scene.things[0])
    if scene.style == "ninja":
        for t in scene.things:  # and an orange headband
            _paint(canvas, _rect(t.cx - t.radius * 0.9, t.cy - t.radius * 0.45, t.cx + t.radius * 0.9,
                                 t.cy - t.radius * 0.25) & shape_mask(t.cls, t.cx, t.cy, t.radius), (255, 120, 0))
    img = canvas.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# --- the ground-truth aesthetic ------------------------------------------------------------


def _luminance(rgb) -> float:
    r, g, b = (c / 255 for c in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def aesthetic(scene: Scene) -> float:
    """What this world finds beautiful, on a 1-10 scale: one object, large, centred, standing out
    from its background, drawn as a photo, uncluttered. A formula over the drawing parameters."""
    t = scene.things[0]
    colour = t.paint()[0]
    contrast = abs(_luminance(colour) - _luminance(BACKGROUNDS[scene.background]))  # 0..1
    off_centre = math.hypot(t.cx - 16, t.cy - 16) / math.hypot(10, 10)  # 0 centre .. ~1 corner
    size = (t.radius - RADIUS[0]) / (RADIUS[1] - RADIUS[0])
    score = 3.0 + 3.0 * contrast + 2.0 * (1.0 - min(off_centre, 1.0)) + 1.5 * size
    score -= 1.0 * (len(scene.things) > 1) + 0.5 * (scene.accessory is not None) + 0.5 * (scene.style != "photo")
    return float(np.clip(score, 1.0, 10.0))
