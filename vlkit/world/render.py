"""Render a scene with Pillow at any resolution and aspect."""

from __future__ import annotations

import math
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

from vlkit.world.scene import BACKGROUND, COLORS, TEXT_SIZE, Obj, Scene

SUPERSAMPLE = 2  # draw at 2x and downsample: smooth edges at small sizes, still fast


@lru_cache(maxsize=64)
def _font(px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(4, px))


def _polygon(obj: Obj, cx: float, cy: float, rx: float, ry: float) -> list[tuple[float, float]] | None:
    """The outline of `obj` about pixel centre (cx, cy) with half extents (rx, ry); None for a circle or square."""
    if obj.shape == "triangle":
        return [(cx, cy - ry), (cx + rx, cy + ry), (cx - rx, cy + ry)]
    if obj.shape == "diamond":
        return [(cx, cy - ry), (cx + rx, cy), (cx, cy + ry), (cx - rx, cy)]
    if obj.shape == "hexagon":
        return [(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in (math.pi / 3 * k for k in range(6))]
    if obj.shape == "star":
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            f = 1.0 if k % 2 == 0 else 0.45
            pts.append((cx + rx * f * math.cos(a), cy + ry * f * math.sin(a)))
        return pts
    if obj.shape == "cross":
        wx, wy = rx * 0.36, ry * 0.36
        return [(cx - wx, cy - ry), (cx + wx, cy - ry), (cx + wx, cy - wy), (cx + rx, cy - wy), (cx + rx, cy + wy),
                (cx + wx, cy + wy), (cx + wx, cy + ry), (cx - wx, cy + ry), (cx - wx, cy + wy), (cx - rx, cy + wy),
                (cx - rx, cy - wy), (cx - wx, cy - wy)]
    return None


def render(scene: Scene, resolution: int = 64, text_size: float = TEXT_SIZE) -> Image.Image:
    """An RGB image of `scene`, `resolution` pixels on its longer side (`scene.image_size`). Object boxes in
    pixels are `scene.box(obj)` times (width, height); `text_size` is the font size as a fraction of the
    shorter side (text written on an object shrinks with the object's `size_scale`)."""
    width, height = scene.image_size(resolution)
    w, h = width * SUPERSAMPLE, height * SUPERSAMPLE
    img = Image.new("RGB", (w, h), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        fill = COLORS[obj.color]
        hx, hy = scene.half_extents(obj)
        x1, y1, x2, y2 = scene.box(obj)
        x1, y1, x2, y2 = x1 * w, y1 * h, x2 * w, y2 * h
        if obj.shape == "circle":
            draw.ellipse((x1, y1, x2, y2), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x1, y1, x2, y2), fill=fill)
        else:
            draw.polygon(_polygon(obj, obj.cx * w, obj.cy * h, hx * w, hy * h), fill=fill)
    if scene.text is not None:
        t = scene.text
        # Text is small relative to the image: at the default size legible at high resolution, barely at 64 px.
        em = text_size * min(w, h) * (scene.size_scale if t.on is not None else 1.0)
        color = (10, 10, 10) if t.on is not None else (235, 235, 235)
        draw.text((t.cx * w, t.cy * h), t.value, fill=color, font=_font(int(round(em))), anchor="mm")
    return img.resize((width, height), Image.Resampling.LANCZOS)
