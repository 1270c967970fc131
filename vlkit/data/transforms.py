"""Image -> tensor transforms, and an on-disk cache of decoded image arrays."""

from __future__ import annotations

import os

import numpy as np
import torch

from vlkit.data.images import load_image_array
from vlkit.fileio import atomic_path, cache_root, stable_hash


def normalize(pixels: torch.Tensor | np.ndarray, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W), scaled to [0, 1] then normalised per channel."""
    if isinstance(pixels, np.ndarray) and not pixels.flags.writeable:
        pixels = pixels.copy()
    x = torch.as_tensor(pixels)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def cached_image_array(paths: list[str], resolution: int) -> np.ndarray:
    """All images decoded once into (N, R, R, 3) uint8 and kept on disk, keyed by the files and size."""
    key = stable_hash({"paths": paths, "res": resolution,
                       "stat": [(os.stat(p).st_size, int(os.stat(p).st_mtime)) for p in paths]}, 16)
    path = cache_root() / "pixels" / f"{key}.npy"
    if path.is_file():
        return np.load(path)
    arr = load_image_array(paths, resolution)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr)
    return arr


def unique_paths(records: list[dict], position: int = 0) -> tuple[list[str], list[int]]:
    """Distinct image paths (at `position` in each record) and each record's index among them."""
    index: dict[str, int] = {}
    rows = []
    for r in records:
        p = r["images"][position]
        rows.append(index.setdefault(p, len(index)))
    return list(index), rows
