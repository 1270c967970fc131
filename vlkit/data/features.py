"""Images of a dataset as decoded pixels or as cached features of a frozen vision tower.

Features are computed once per (tower weights, feature layer, selection, resolution) and image, and
kept on disk as float32 ``.npy`` shards under ``$VLKIT_CACHE/features/<tower>/``; training with them
skips the tower's forward pass entirely (it is frozen, so the numbers are the same).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from vlkit.console import bar
from vlkit.data.transforms import cached_image_array, normalize
from vlkit.fileio import atomic_path, cache_root, read_json, stable_hash, write_json


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


class CachedFeatures:
    """Features of a list of images, read from one or more cached shards (memory-mapped) row by row."""

    def __init__(self, shards: list[np.ndarray], where: list[tuple[int, int]]):
        self.shards = shards
        self.shard = np.array([s for s, _ in where], dtype=np.int64)
        self.row = np.array([r for _, r in where], dtype=np.int64)
        self.shape = (len(where), *shards[0].shape[1:]) if shards else (0,)

    def __len__(self) -> int:
        return len(self.row)

    def __getitem__(self, rows) -> np.ndarray:
        rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
        out = np.empty((len(rows), *self.shape[1:]), np.float32)
        shard = self.shard[rows]
        for s in np.unique(shard):
            hit = shard == s
            out[hit] = self.shards[s][self.row[rows[hit]]]
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        a = self[np.arange(len(self))]
        return a if dtype is None else a.astype(dtype)


def cached_features(tower, paths: list[str], pixels: np.ndarray, progress: bool | None = None) -> CachedFeatures:
    """Features of `paths` (rows of `pixels`) under this tower. The cache holds, per tower, shards of features
    with the image paths they cover; only images no shard covers are computed (one new shard), so a
    recipe whose records select other tasks, a subset or another order reuses what earlier runs computed."""
    root = cache_root() / "features" / stable_hash({"tower": tower_fingerprint(tower), "res": tower.image_size}, 20)
    shards: list[np.ndarray] = []
    where_of: dict[str, tuple[int, int]] = {}
    for index in sorted(root.glob("*.json")) if root.is_dir() else []:
        data = index.with_suffix(".npy")
        if not data.is_file():  # an index is written after its data, so this is a shard being written
            continue
        for r, p in enumerate(read_json(index)):
            where_of.setdefault(p, (len(shards), r))
        shards.append(np.load(data, mmap_mode="r"))
    missing = [i for i, p in enumerate(paths) if p not in where_of]
    if missing:
        new = [paths[i] for i in missing]
        name = stable_hash(new, 20)
        feats = compute_features(tower, pixels[missing], progress=progress)
        with atomic_path(root / f"{name}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, feats)
        write_json(root / f"{name}.json", new)
        for r, p in enumerate(new):
            where_of.setdefault(p, (len(shards), r))
        shards.append(np.load(root / f"{name}.npy", mmap_mode="r"))
    return CachedFeatures(shards, [where_of[p] for p in paths])


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
        self.features: CachedFeatures | None = None

    def rows(self, record: dict) -> list[int]:
        return [self.index[p] for p in record["images"]]

    def use_features(self, tower, progress: bool | None = None) -> "ImageBank":
        self.features = cached_features(tower, self.paths, self.pixels, progress)
        return self

    def inputs(self, rows: list[int]) -> dict[str, torch.Tensor]:
        """Model inputs for these images: cached features when available, else pixels."""
        if self.features is not None:
            return {"image_features": torch.from_numpy(self.features[rows])}
        return {"pixel_values": normalize(self.pixels[rows], self.mean, self.std)}
