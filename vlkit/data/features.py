"""Images of a dataset as decoded pixels or as cached features of frozen vision encoders.

Pixels are decoded once per (image files, transform geometry) and kept on disk as uint8. Features are
computed once per (encoder weights, feature settings, transform) and image, and kept on disk as float32
``.npy`` shards under ``$VLKIT_CACHE/features/<encoder>/``; training with them skips the encoders'
forward passes entirely (they are frozen, so the numbers are the same). A vision stack of several
encoders caches each encoder's features on its own. A tiled (high-resolution) model's images are their
views: pixels (n, V, S, S, 3), features (n, V, N, C), with a view mask (n, V) of the views each image keeps.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from vlkit.console import bar
from vlkit.data.transforms import ImageTransform
from vlkit.errors import VlkitError
from vlkit.fileio import atomic_path, cache_root, read_json, stable_hash, write_json


# Image inputs of a model (pixels or cached features) are a tensor for a one-encoder vision stack and a list,
# one tensor per encoder, for several.
def as_list(x) -> list[torch.Tensor]:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def as_batch(parts: list[torch.Tensor]):
    """The inverse of `as_list`: a tensor for one encoder, a list for several."""
    return parts[0] if len(parts) == 1 else parts


def count(x) -> int:
    """Images in a stack input (0 for None)."""
    return 0 if x is None else len(as_list(x)[0])


def select(x, rows: torch.Tensor):
    """The given image rows of a stack input."""
    return as_batch([t[rows] for t in as_list(x)])


def repeat(x, n: int):
    """A one-image stack input repeated n times (expanded, no copy)."""
    return as_batch([t.expand(n, *t.shape[1:]) for t in as_list(x)])


@torch.no_grad()
def compute_features(encoder, pixels: np.ndarray, batch_size: int = 128, progress: bool | None = None) -> np.ndarray:
    """uint8 (n, S, S, 3) pixels -> float32 features (n, N, C) of one encoder; views (n, V, S, S, 3) ->
    (n, V, N, C)."""
    if pixels.ndim == 5:
        flat = compute_features(encoder, pixels.reshape(-1, *pixels.shape[2:]), batch_size, progress)
        return flat.reshape(len(pixels), pixels.shape[1], *flat.shape[1:])
    chunks = []
    for i in bar(range(0, len(pixels), batch_size), desc="features", enabled=progress):
        chunks.append(encoder(encoder.transform.normalize(pixels[i:i + batch_size])).float().cpu().numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, encoder.num_tokens, encoder.width), np.float32)


STORED = {"fp32": np.float32, "fp16": np.float16}  # how cached features may be stored


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


def cached_features(encoder, paths: list[str], pixels: np.ndarray, progress: bool | None = None,
                    tiler=None, dtype: str = "fp32") -> CachedFeatures:
    """Features of `paths` (rows of `pixels`, decoded with the encoder's transform, cut into views by `tiler`)
    under this encoder. The cache holds, per encoder (and view geometry), shards of features with the image paths
    they cover; only images no shard covers are computed (one new shard), so a recipe whose records select other
    tasks, a subset or another order reuses what earlier runs computed. `dtype` fp16 stores them in half the
    space (a cache of its own; read back as float32)."""
    if dtype not in STORED:
        raise VlkitError(f"cache_features: {dtype!r} is not a storage dtype; use true (fp32) or fp16")
    key = {"encoder": encoder.fingerprint()} if tiler is None else {"encoder": encoder.fingerprint(), **tiler.geometry}
    if dtype != "fp32":  # fp32 caches keep the key they always had
        key["dtype"] = dtype
    root = cache_root() / "features" / stable_hash(key, 20)
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
        feats = compute_features(encoder, pixels[missing], progress=progress).astype(STORED[dtype], copy=False)
        with atomic_path(root / f"{name}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, feats)
        write_json(root / f"{name}.json", new)
        for r, p in enumerate(new):
            where_of.setdefault(p, (len(shards), r))
        shards.append(np.load(root / f"{name}.npy", mmap_mode="r"))
    return CachedFeatures(shards, [where_of[p] for p in paths])


class ImageBank:
    """Every distinct image of a set of records, addressable by row, as each encoder's transform sees it (cut into
    views by `tiler` for a high-resolution model)."""

    def __init__(self, records: list[dict], transforms: list[ImageTransform], progress: bool | None = None,
                 tiler=None):
        index: dict[str, int] = {}
        for r in records:
            for p in r["images"]:
                if p not in index:
                    if not os.path.isfile(p):
                        raise VlkitError(f"record {r.get('id', '?')}: image {p} not found; check the record's images "
                                         "(paths are relative to its JSONL file)")
                    index[p] = len(index)
        self.index = index
        self.paths = list(index)
        self.transforms = list(transforms)
        decoded: dict[str, np.ndarray] = {}  # transforms of one geometry share their pixels
        self.pixels: list[np.ndarray] = []
        for t in self.transforms:
            key = stable_hash(t.geometry)
            if key not in decoded:
                decoded[key] = t.cached_arrays(self.paths, progress, tiler=tiler)
            self.pixels.append(decoded[key])
        self.tiler = tiler
        self.view_mask = None if tiler is None else torch.from_numpy(tiler.masks(
            [image_size(p) for p in self.paths]) if self.paths else np.zeros((0, tiler.num_views), bool))
        self.features: list[CachedFeatures] | None = None

    @classmethod
    def of(cls, records: list[dict], processor, progress: bool | None = None) -> "ImageBank":
        """The bank of these records' images as `processor` (a `VLProcessor`) prepares them."""
        return cls(records, processor.transforms, progress, tiler=processor.tiler)

    def rows(self, record: dict) -> list[int]:
        return [self.index[p] for p in record["images"]]

    def views(self, rows: list[int]) -> list[int] | None:
        """Views each of these images keeps (None: every image keeps every view)."""
        return None if self.view_mask is None else self.view_mask[rows].sum(1).tolist()

    def use_features(self, stack, progress: bool | None = None, dtype: str = "fp32") -> "ImageBank":
        """Serve cached features of the stack's (frozen) encoders instead of pixels (stored in `dtype`)."""
        self.features = [cached_features(e, self.paths, px, progress, self.tiler, dtype)
                         for e, px in zip(stack.encoders, self.pixels)]
        return self

    def inputs(self, rows: list[int]) -> dict:
        """Model inputs for these images: cached features when available, else pixels (+ the view mask)."""
        out = {} if self.view_mask is None else {"view_mask": self.view_mask[rows]}
        if self.features is not None:
            return {**out, "image_features": as_batch([torch.from_numpy(f[rows]) for f in self.features])}
        return {**out, "pixel_values": as_batch([t.normalize(px[rows]) for t, px in zip(self.transforms, self.pixels)])}


def image_size(path: str) -> tuple[int, int]:
    """(width, height) of an image file as decoded upright (EXIF orientations 5-8 swap them), from its header."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
        try:
            turned = im.getexif().get(0x0112) in (5, 6, 7, 8)
        except (OSError, ValueError, SyntaxError):  # a malformed EXIF block: decoding keeps the pixels as stored
            turned = False
    return (h, w) if turned else (w, h)
