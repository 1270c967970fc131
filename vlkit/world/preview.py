"""Contact sheets: sample images beside their texts, one PNG to look at."""

from __future__ import annotations

import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from vlkit.data.images import load_image
from vlkit.data.records import message_text
from vlkit.fileio import atomic_path


def contact_sheet(rows: list[tuple[list[str | Path | Image.Image], list[str]]], path: str | Path,
                  thumb: int = 128, text_width: int = 420, title: str | None = None) -> Path:
    """Write a PNG with one row per sample: its images (scaled to `thumb`) and lines of text."""
    font = ImageFont.load_default(size=13)
    n_img = max((len(imgs) for imgs, _ in rows), default=1)
    wrapped = [[w for line in lines for w in (textwrap.wrap(line, 58) or [""])] for _, lines in rows]
    heights = [max(thumb, 17 * len(w) + 8) + 8 for w in wrapped]
    top = 28 if title else 4
    width = n_img * (thumb + 6) + text_width
    sheet = Image.new("RGB", (width, top + sum(heights)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((6, 6), title, fill=(0, 0, 0), font=ImageFont.load_default(size=16))
    y = top
    for (imgs, _), lines, h in zip(rows, wrapped, heights):
        for k, im in enumerate(imgs):
            im = im if isinstance(im, Image.Image) else load_image(im)
            scale = thumb / max(im.size)  # the longer side fills the thumbnail: non-square images keep their shape
            size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
            sheet.paste(im.resize(size, Image.Resampling.NEAREST), (4 + k * (thumb + 6), y))
        for j, line in enumerate(lines):
            draw.text((n_img * (thumb + 6) + 6, y + 4 + 17 * j), line, fill=(20, 20, 20), font=font)
        y += h
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return Path(path)


def record_lines(record: dict) -> list[str]:
    lines = [f"[{record['task']}] {record['id']}"]
    for m in record["messages"]:
        lines.append(f"{m['role']}: {message_text(m, image_token='<image>')}")
    return lines


def preview_records(records: list[dict], path: str | Path, title: str | None = None) -> Path:
    return contact_sheet([(r["images"], record_lines(r)) for r in records], path, title=title)
