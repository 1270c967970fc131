"""Scenes of the shapes world: seeded, deterministic, resolution-free.

A scene holds 1-6 objects, each a shape, a colour, a size and a centre in normalised [0, 1]
coordinates, and at most one piece of text, written on an object or on the background. Boxes are
normalised ``(x1, y1, x2, y2)``; every pixel quantity is derived at render time, so the same scene
renders at 64x64 or 448x448.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

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


def plural(shape: str) -> str:
    return PLURALS.get(shape, shape + "s")


class WorldConfig(Section):
    """How scenes are drawn. Part of the cache key of every generated dataset."""

    min_objects: int = Field(1, ge=1, le=6, description="Fewest objects in a scene.")
    max_objects: int = Field(6, ge=1, le=6, description="Most objects in a scene.")
    text_prob: float = Field(0.3, ge=0, le=1, description="Chance that a scene carries a word or number.")
    digit_prob: float = Field(0.3, ge=0, le=1, description="Chance that the text is a number rather than a word.")
    resolution: int = Field(64, ge=16, le=2048, description="Rendered image side in pixels.")


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

    def to_dict(self) -> dict:
        return {"objects": [asdict(o) for o in self.objects],
                "text": asdict(self.text) if self.text else None, "seed": self.seed}

    @staticmethod
    def from_dict(d: dict) -> "Scene":
        text = Text(**d["text"]) if d.get("text") else None
        return Scene(tuple(Obj(**o) for o in d["objects"]), text, d.get("seed", 0))

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
    return Scene(tuple(objects), text, seed)
