"""Render a scene with Pillow at any resolution."""

from __future__ import annotations

import math
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

from vlkit.world.scene import BACKGROUND, COLORS, Obj, Scene

SUPERSAMPLE = 2  # draw at 2x and downsample: smooth edges at small sizes, still fast


@lru_cache(maxsize=64)
def _font(px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(4, px))


def _polygon(obj: Obj, s: float) -> list[tuple[float, float]] | None:
    cx, cy, r = obj.cx * s, obj.cy * s, obj.half * s
    if obj.shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if obj.shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if obj.shape == "hexagon":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (math.pi / 3 * k for k in range(6))]
    if obj.shape == "star":
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rr = r if k % 2 == 0 else r * 0.45
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    if obj.shape == "cross":
        w = r * 0.36
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
                (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
                (cx - r, cy - w), (cx - w, cy - w)]
    return None


def render(scene: Scene, resolution: int = 64) -> Image.Image:
    """An RGB image of `scene`, `resolution` pixels square."""
    s = resolution * SUPERSAMPLE
    img = Image.new("RGB", (s, s), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        fill = COLORS[obj.color]
        poly = _polygon(obj, s)
        x1, y1, x2, y2 = (v * s for v in obj.box)
        if obj.shape == "circle":
            draw.ellipse((x1, y1, x2, y2), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x1, y1, x2, y2), fill=fill)
        else:
            draw.polygon(poly, fill=fill)
    if scene.text is not None:
        t = scene.text
        # Text is small relative to the image: legible at high resolution, barely at 64 px.
        font = _font(int(round(0.075 * s)))
        color = (10, 10, 10) if t.on is not None else (235, 235, 235)
        draw.text((t.cx * s, t.cy * s), t.value, fill=color, font=font, anchor="mm")
    return img.resize((resolution, resolution), Image.Resampling.LANCZOS)
