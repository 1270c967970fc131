"""Safe image decoding: size limits, EXIF orientation, mode conversion, clear errors.

Everything here ends in an RGB PIL image; `vlkit.data.transforms.ImageTransform` takes it from there.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vlkit.errors import VlkitError

MAX_PIXELS = 40_000_000  # above this an image is refused (decompression bombs)


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open an image file as RGB. Zero-byte, truncated, corrupt and oversized files are one-line errors."""
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
    """Any PIL image -> RGB, upright: the EXIF orientation applied, transparency composited on white (what a
    viewer shows), 16/32-bit greyscale scaled to 8 bits, palette, CMYK and greyscale converted."""
    try:
        img = ImageOps.exif_transpose(img)
    except (OSError, ValueError, SyntaxError):  # a malformed EXIF block: keep the pixels as stored
        pass
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        img = Image.fromarray(np.clip(np.round(arr / hi * 255), 0, 255).astype(np.uint8))
    elif img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
        img = Image.fromarray(np.clip(np.round(arr * 255), 0, 255).astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        base = Image.new("RGB", rgba.size, (255, 255, 255))
        base.paste(rgba, mask=rgba.getchannel("A"))
        return base
    return img.convert("RGB")


def array_to_image(arr: np.ndarray, where: str = "image array") -> Image.Image:
    """A numpy image -> PIL: HxW, HxWx1, HxWx3 or HxWx4 (channels last); uint8, uint16, bool, or float in
    [0, 1]. Anything else is a one-line error saying what was given."""
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        hint = "; channels go last (transpose a CxHxW array)" if a.ndim == 3 and a.shape[0] in (1, 3, 4) else ""
        raise VlkitError(f"{where}: shape {a.shape} is not an image (HxW, HxWx1, HxWx3 or HxWx4){hint}")
    if 0 in a.shape:
        raise VlkitError(f"{where}: shape {a.shape} has no pixels")
    if a.dtype == np.uint8:
        pass
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        a = np.round(a.astype(np.float64) / 257.0).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or a.min() < -1e-6 or a.max() > 1 + 1e-6:
            raise VlkitError(f"{where}: float pixels must be finite and within [0, 1] (got "
                             f"{np.nanmin(a):.3g}..{np.nanmax(a):.3g}); scale them or pass uint8")
        a = np.round(np.clip(a, 0, 1) * 255).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.integer) and a.min() >= 0 and a.max() <= 255:
        a = a.astype(np.uint8)
    else:
        raise VlkitError(f"{where}: dtype {a.dtype} is not an image dtype (uint8, uint16, bool or float in [0, 1])")
    return Image.fromarray(np.ascontiguousarray(a))  # L, RGB or RGBA from the shape
