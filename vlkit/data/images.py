"""Safe image loading: size limits, mode conversion, clear errors."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from vlkit.errors import VlkitError

MAX_PIXELS = 40_000_000  # above this an image is refused (decompression bombs)


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open an image as RGB. Zero-byte, truncated, corrupt and oversized files are one-line errors;
    RGBA/LA/P with transparency are composited on black, CMYK/16-bit/grayscale converted."""
    path = Path(path)
    if not path.is_file():
        raise VlkitError(f"{path}: image not found; check the path (relative paths are relative to the JSONL)")
    if path.stat().st_size == 0:
        raise VlkitError(f"{path}: image file is empty (0 bytes); replace it")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            w, h = img.size
            if w * h > max_pixels:
                raise VlkitError(f"{path}: image is {w}x{h} = {w * h:,} pixels, above the limit of "
                                 f"{max_pixels:,}; downscale it first")
            img.load()
    except VlkitError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise VlkitError(f"{path}: image is too large (decompression bomb guard); downscale it first") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise VlkitError(f"{path}: unreadable or truncated image ({str(e).splitlines()[0]}); replace it") from None
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() or 1.0
        img = Image.fromarray((arr / hi * 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        base = Image.new("RGB", rgba.size, (0, 0, 0))
        base.paste(rgba, mask=rgba.getchannel("A"))
        return base
    return img.convert("RGB")


def load_image_array(paths: list[str], resolution: int) -> np.ndarray:
    """Decode images into one uint8 array (N, resolution, resolution, 3), resizing where needed."""
    out = np.empty((len(paths), resolution, resolution, 3), dtype=np.uint8)
    for i, p in enumerate(paths):
        img = load_image(p)
        if img.size != (resolution, resolution):
            img = img.resize((resolution, resolution), Image.Resampling.BICUBIC)
        out[i] = np.asarray(img)
    return out
