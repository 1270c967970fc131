"""Images of a dataset as decoded pixels or as cached features of a frozen vision tower.

Features are computed once per (tower weights, feature layer, selection, image files) and kept on
disk as float32 ``.npy`` under ``$VLKIT_CACHE/features``; training with them skips the tower's
forward pass entirely (it is frozen, so the numbers are the same).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from vlkit.console import bar
from vlkit.data.transforms import cached_image_array, normalize
from vlkit.fileio import atomic_path, cache_root, stable_hash


def tower_fingerprint(tower) -> str:
    """Identity of a tower's features: its tensors (one at a time, so memory stays flat), the feature layer,
    selection and normalisation. Hashing the tensors rather than the files they came from makes the tower
    of a saved VLM (inside its one weights file) share features with the tower directory it started from."""
    h = hashlib.sha256()
    for name, t in sorted(tower.model.state_dict().items()):
        h.update(f"{name}/{t.dtype}/{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
    h.update(f"{tower.cfg.feature_layer}/{tower.cfg.select}/{tower.image_mean}/{tower.image_std}".encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def compute_features(tower, pixels: np.ndarray, batch_size: int = 128, progress: bool | None = None) -> np.ndarray:
    device = next(tower.parameters()).device
    chunks = []
    for i in bar(range(0, len(pixels), batch_size), desc="features", enabled=progress):
        px = normalize(pixels[i:i + batch_size], tower.image_mean, tower.image_std).to(device)
        chunks.append(tower(px).float().cpu().numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, tower.num_features(), tower.hidden_size), np.float32)


def cached_features(tower, paths: list[str], pixels: np.ndarray, progress: bool | None = None) -> np.ndarray:
    key = stable_hash({"tower": tower_fingerprint(tower), "images": stable_hash(paths, 16),
                       "res": tower.image_size}, 20)
    path = cache_root() / "features" / f"{key}.npy"
    if path.is_file():
        return np.load(path, mmap_mode="r")
    feats = compute_features(tower, pixels, progress=progress)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, feats)
    return np.load(path, mmap_mode="r")


class ImageBank:
    """Every distinct image of a set of records, addressable by row."""

    def __init__(self, records: list[dict], image_size: int, mean: list[float], std: list[float]):
        index: dict[str, int] = {}
        for r in records:
            for p in r["images"]:
                index.setdefault(p, len(index))
        self.index = index
        self.paths = list(index)
        self.mean, self.std = mean, std
        self.pixels = cached_image_array(self.paths, image_size) if self.paths else \
            np.zeros((0, image_size, image_size, 3), np.uint8)
        self.features: np.ndarray | None = None

    def rows(self, record: dict) -> list[int]:
        return [self.index[p] for p in record["images"]]

    def use_features(self, tower, progress: bool | None = None) -> "ImageBank":
        self.features = cached_features(tower, self.paths, self.pixels, progress)
        return self

    def inputs(self, rows: list[int]) -> dict[str, torch.Tensor]:
        """Model inputs for these images: cached features when available, else pixels."""
        if self.features is not None:
            return {"image_features": torch.from_numpy(np.asarray(self.features[rows], dtype=np.float32))}
        return {"pixel_values": normalize(self.pixels[rows], self.mean, self.std)}
