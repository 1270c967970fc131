"""High-resolution input as views: one global view plus k x k sub-images (SPHINX, sec. 3.3).

    image (any size) -> pad to a square with the mean colour          (LLaVA-1.5 / SPHINX expand-to-square)
                     -> global view: the square resized to S
                     -> sub-images: the square resized to k*S, cut into k x k tiles of S, raster order
    views = [global, tile(0,0), tile(0,1), ..., tile(k-1,k-1)]       V = 1 + k^2

Every view goes through every encoder (in one batch), so an image takes V x (tokens per view) token slots.
Options beyond SPHINX: `skip_padding` drops the sub-images that lie entirely in the padding (SPHINX-X), and the
image's token count follows; `positions` adds a learned embedding per view index (zero at first, so a model
starts as it would without them).

A tile is padding when its area in the padded square does not overlap the pasted image (decided by geometry on
exact integers, not by pixel values, which an image may share with its padding).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image
from pydantic import Field

from vlkit.config import Section
from vlkit.data.transforms import pad_to_square


class TileConfig(Section):
    """How an image becomes views: a global view plus k x k sub-images."""

    k: int = Field(..., ge=1, le=8, description="Sub-images per side (SPHINX: 2, at 448 px for 224 px encoders).")
    size: int | None = Field(None, gt=0, description="Side of each view in pixels (default: the first encoder's "
                             "input size); the padded image is resized to k * size before it is cut.")
    skip_padding: bool = Field(False, description="Drop sub-images that lie entirely in the padding of a "
                               "non-square image (SPHINX-X); that image then takes fewer token slots.")
    positions: bool = Field(False, description="Add a learned embedding per view (global, tile 1, ...) to its "
                            "tokens, zero-initialised.")

    @property
    def num_views(self) -> int:
        """V = 1 + k^2."""
        return 1 + self.k * self.k


class Tiler:
    """Cuts images into views as a `TileConfig` says, at view side `size`, padding with `fill` (8-bit RGB)."""

    def __init__(self, config: TileConfig, size: int, fill: tuple[int, int, int]):
        self.config, self.size, self.fill = config, size, tuple(fill)

    @property
    def k(self) -> int:
        return self.config.k

    @property
    def num_views(self) -> int:
        return self.config.num_views

    @property
    def geometry(self) -> dict:
        """What decides the views' pixels (part of every pixel and feature cache key of tiled images)."""
        return {"tiles": self.k, "view": self.size, "fill": list(self.fill)}

    def mask(self, width: int, height: int) -> list[bool]:
        """Which of the V views of a width x height image are kept (the global view always)."""
        if not self.config.skip_padding:
            return [True] * self.num_views
        side, k = max(width, height), self.k
        x0, y0 = (side - width) // 2, (side - height) // 2  # where `pad_to_square` pastes the image
        x1, y1 = x0 + width, y0 + height

        def overlaps(i: int, lo: int, hi: int) -> bool:  # tile i spans [i*side/k, (i+1)*side/k); scaled by k
            return i * side < k * hi and (i + 1) * side > k * lo

        return [True] + [overlaps(r, y0, y1) and overlaps(c, x0, x1) for r in range(k) for c in range(k)]

    def views(self, img: Image.Image) -> list[Image.Image]:
        """An RGB image -> its V views, each size x size, in order (padded ones included)."""
        square, s, k = pad_to_square(img, self.fill), self.size, self.k
        big = square.resize((k * s, k * s), Image.Resampling.BICUBIC)
        tiles = [big.crop((c * s, r * s, (c + 1) * s, (r + 1) * s)) for r in range(k) for c in range(k)]
        return [square.resize((s, s), Image.Resampling.BICUBIC), *tiles]

    def arrays(self, img: Image.Image, transform) -> np.ndarray:
        """uint8 (V, S_e, S_e, 3): the views as an encoder's transform sees them."""
        return np.stack([np.asarray(transform.resized(v), dtype=np.uint8) for v in self.views(img)])

    def masks(self, sizes: Sequence[tuple[int, int]]) -> np.ndarray:
        """bool (n, V) for images of these (width, height)."""
        return np.array([self.mask(w, h) for w, h in sizes], dtype=bool).reshape(len(sizes), self.num_views)
