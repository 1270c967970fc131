"""Scenes of the shapes world: seeded, deterministic, resolution-free.

A scene holds 1-6 objects, each a shape, a colour, a size and a centre in normalised [0, 1]
coordinates, and at most one piece of text, written on an object or on the background. Boxes are
normalised ``(x1, y1, x2, y2)``; every pixel quantity is derived at render time, so the same scene
renders at 64x64 or 448x448.

A scene may be wider or taller than square (``Scene.aspect`` = width / height): normalised x runs along
the width and y along the height, and object sizes are fractions of the *shorter* side so shapes are not
stretched. ``Obj.box`` is the object's *layout* box (the square box that generation keeps clear of the
others); ``Scene.box(obj)`` is where the object is in the image, in the image's own normalised
coordinates. The image box lies inside the layout box (same centre, each half-extent scaled by a factor
<= 1), so objects laid out apart stay apart at any aspect and any ``size_scale``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Annotated

import numpy as np
from pydantic import Field

from vlkit.config import Section

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross")
PLURALS = {"cross": "crosses"}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 235),
    "yellow": (240, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 135, 25),
    "cyan": (40, 205, 215),
    "white": (240, 240, 240),
}
SIZES = {"small": 0.17, "large": 0.30}  # side of the object's box, as a fraction of the image side
REGIONS = (("top left", "top", "top right"), ("left", "center", "right"), ("bottom left", "bottom", "bottom right"))
WORDS = ("cat", "dog", "sun", "map", "box", "car", "tree", "fish", "moon", "key", "cup", "hat", "bird", "lamp",
         "ship", "star", "door", "book", "bell", "rose")
TEXT_NUMBERS = range(10, 100)  # the numbers a scene may carry instead of a word
BACKGROUND = (24, 24, 28)
TEXT_SIZE = 0.075  # font size (em height) of a scene's text, as a fraction of the image's shorter side


def plural(shape: str) -> str:
    return PLURALS.get(shape, shape + "s")


class WorldConfig(Section):
    """How scenes are drawn. Part of the cache key of every generated dataset."""

    min_objects: int = Field(1, ge=1, le=6, description="Fewest objects in a scene.")
    max_objects: int = Field(6, ge=1, le=6, description="Most objects in a scene.")
    text_prob: float = Field(0.3, ge=0, le=1, description="Chance that a scene carries a word or number.")
    digit_prob: float = Field(0.3, ge=0, le=1, description="Chance that the text is a number rather than a word.")
    resolution: int = Field(64, ge=16, le=2048, description="Rendered image side in pixels (the longer side "
                            "of a non-square image).")
    # Added later; left out of dataset cache keys at their defaults (vlkit.world.dataset.cache_fields).
    text_size: float = Field(TEXT_SIZE, ge=0.01, le=0.2, description="Font size of the scene's text as a fraction "
                             "of the image's shorter side (digit height is ~0.72 of it). Above the default, text on "
                             "the background may reach into objects (its clearance is sized for the default).")
    aspects: list[Annotated[float, Field(ge=0.25, le=4.0)]] = Field(
        default_factory=lambda: [1.0], min_length=1, description="Width / height ratios an image may have; one "
        "is drawn per scene (after everything else the scene draws, so scenes keep their objects and text).")
    size_scale: float = Field(1.0, ge=0.2, le=1.0, description="Objects are drawn at this fraction of their size "
                              "about the same centres (fine detail); <= 1 keeps the layout overlap-free.")


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    cx: float
    cy: float

    @property
    def half(self) -> float:
        return SIZES[self.size] / 2

    @property
    def box(self) -> tuple[float, float, float, float]:
        h = self.half
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)

    @property
    def region(self) -> str:
        col = min(2, int(self.cx * 3))
        row = min(2, int(self.cy * 3))
        return REGIONS[row][col]

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Text:
    value: str
    on: int | None  # index of the object it is written on, or None for the background
    cx: float
    cy: float


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    text: Text | None = None
    seed: int = field(default=0, compare=False)
    aspect: float = 1.0  # image width / height
    size_scale: float = 1.0  # objects drawn at this fraction of their layout size (<= 1)

    def to_dict(self) -> dict:
        d = {"objects": [asdict(o) for o in self.objects],
             "text": asdict(self.text) if self.text else None, "seed": self.seed}
        # Left out at their defaults: the scenes of square worlds keep the dicts they always had.
        if self.aspect != 1.0:
            d["aspect"] = self.aspect
        if self.size_scale != 1.0:
            d["size_scale"] = self.size_scale
        return d

    @staticmethod
    def from_dict(d: dict) -> "Scene":
        text = Text(**d["text"]) if d.get("text") else None
        return Scene(tuple(Obj(**o) for o in d["objects"]), text, d.get("seed", 0), d.get("aspect", 1.0),
                     d.get("size_scale", 1.0))

    def half_extents(self, obj: Obj) -> tuple[float, float]:
        """The object's half width and half height in this image's normalised coordinates: its size is a
        fraction of the shorter side, so the longer axis gets the smaller normalised extent."""
        h = obj.half * self.size_scale
        return h * min(1.0, 1.0 / self.aspect), h * min(1.0, self.aspect)

    def box(self, obj: Obj) -> tuple[float, float, float, float]:
        """Where `obj` is in this scene's image, normalised (x1, y1, x2, y2); equals `obj.box` when the scene
        is square at full size."""
        hx, hy = self.half_extents(obj)
        return (obj.cx - hx, obj.cy - hy, obj.cx + hx, obj.cy + hy)

    def image_size(self, resolution: int) -> tuple[int, int]:
        """(width, height) in pixels: `resolution` on the longer side."""
        if self.aspect >= 1.0:
            return resolution, max(1, round(resolution / self.aspect))
        return max(1, round(resolution * self.aspect)), resolution

    def ordered(self) -> list[Obj]:
        """Objects in reading order: top to bottom by row band, then left to right."""
        return sorted(self.objects, key=lambda o: (min(2, int(o.cy * 3)), o.cx))

    def replace_objects(self, objects: tuple[Obj, ...]) -> "Scene":
        return replace(self, objects=objects)


def overlaps(box, boxes, margin: float = 0.02) -> bool:
    x1, y1, x2, y2 = box
    return any(x1 < b[2] + margin and b[0] < x2 + margin and y1 < b[3] + margin and b[1] < y2 + margin
               for b in boxes)


def sample_object(rng: np.random.Generator, taken: list, shape: str | None = None, color: str | None = None,
                  size: str | None = None, tries: int = 60) -> Obj | None:
    """A random object whose box stays inside the image and clear of `taken` boxes (None if no room)."""
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    color = color or list(COLORS)[rng.integers(len(COLORS))]
    size = size or ("large" if rng.random() < 0.4 else "small")
    h = SIZES[size] / 2
    for _ in range(tries):
        cx, cy = rng.uniform(h + 0.01, 1 - h - 0.01, size=2)
        obj = Obj(shape, color, size, round(float(cx), 4), round(float(cy), 4))
        if not overlaps(obj.box, taken):
            return obj
    return None


def generate_scene(seed: int, cfg: WorldConfig | None = None) -> Scene:
    """The scene of a seed: a pure function of (seed, cfg)."""
    cfg = cfg or WorldConfig()
    rng = np.random.default_rng(seed)
    n = int(rng.integers(cfg.min_objects, max(cfg.min_objects, cfg.max_objects) + 1))
    objects: list[Obj] = []
    for _ in range(n):
        # Distinct (colour, shape) pairs keep every object nameable by "the <colour> <shape>".
        for _ in range(20):
            obj = sample_object(rng, [o.box for o in objects])
            if obj is None or all(o.name != obj.name for o in objects):
                break
        if obj is None or any(o.name == obj.name for o in objects):
            continue
        objects.append(obj)
    text = None
    if rng.random() < cfg.text_prob:
        if rng.random() < cfg.digit_prob:
            value = str(int(rng.integers(TEXT_NUMBERS.start, TEXT_NUMBERS.stop)))
        else:
            value = WORDS[rng.integers(len(WORDS))]
        large = [i for i, o in enumerate(objects) if o.size == "large" and o.shape in ("circle", "square", "hexagon")]
        if large and rng.random() < 0.5:
            i = large[int(rng.integers(len(large)))]
            text = Text(value, i, objects[i].cx, objects[i].cy)
        else:
            for _ in range(30):
                cx, cy = float(rng.uniform(0.2, 0.8)), float(rng.uniform(0.1, 0.9))
                if not overlaps((cx - 0.14, cy - 0.06, cx + 0.14, cy + 0.06), [o.box for o in objects]):
                    text = Text(value, None, round(cx, 4), round(cy, 4))
                    break
    # Drawn last, and only when there is a choice: every draw above is what it was before aspects existed.
    aspect = cfg.aspects[int(rng.integers(len(cfg.aspects)))] if len(cfg.aspects) > 1 else cfg.aspects[0]
    return Scene(tuple(objects), text, seed, float(aspect), cfg.size_scale)
