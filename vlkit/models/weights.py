"""A model directory's safetensors weights, one file or sharded (`model.safetensors.index.json`), read from their
headers and one tensor at a time: the one reader of loading (io.py: `open_files`), weight mixing (merge.py) and
partial loads (BLIP-2's Q-Former)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from vlkit.errors import VlkitError
from vlkit.fileio import read_json

WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"


def open_files(directory: Path) -> list[tuple[Path, object, bool]]:
    """The directory's safetensors files, opened (headers read, no tensor yet): model.safetensors, or the shards its
    model.safetensors.index.json lists; each with whether its tensors are views of the mapped file (safetensors
    before 0.8, which cannot read them into memory of their own with pread)."""
    index = directory / INDEX
    weight_map = None
    if index.is_file():
        meta = read_json(index)
        weight_map = meta.get("weight_map") if isinstance(meta, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise VlkitError(f"{index}: no weight_map; re-save the model")
    files = []
    for name in sorted(set(weight_map.values())) if weight_map else [WEIGHTS]:
        path = directory / str(name)
        if not path.is_file():
            raise VlkitError(f"{path}: weights file not found; the model directory is incomplete")
        try:
            try:
                handle, mapped = safe_open(str(path), "pt", backend="pread"), False
            except TypeError:
                handle, mapped = safe_open(str(path), "pt"), True
        except (SafetensorError, OSError) as e:
            raise VlkitError(f"{path}: corrupt, truncated or mismatched weights ({str(e).splitlines()[0][:160]}); "
                             "re-save the model") from None
        stray = [k for k in handle.keys() if weight_map is not None and weight_map.get(k) != name]
        if stray:
            raise VlkitError(f"{index}: does not place {stray[0]} in {name}, which holds it; re-save the model")
        files.append((path, handle, mapped))
    return files



class Weights:
    """A directory's safetensors weights, one file or sharded: names, shapes and dtypes from the headers, tensors
    read one at a time."""

    def __init__(self, directory: Path):
        self.directory = directory
        index = directory / INDEX
        if not index.is_file() and not (directory / WEIGHTS).is_file():
            raise VlkitError(f"{directory}: no safetensors weights ({WEIGHTS} or {INDEX}); save the model with "
                             "safetensors")
        self.files = {path.name: handle for path, handle, _ in open_files(directory)}
        self.where = {k: name for name, f in self.files.items() for k in f.keys()}
        if index.is_file() and set(read_json(index)["weight_map"]) != set(self.where):
            raise VlkitError(f"{index}: its weight_map does not list the tensors its files hold; re-save the model")

    def spec(self, name: str) -> tuple[list[int], str]:
        piece = self.files[self.where[name]].get_slice(name)
        return piece.get_shape(), piece.get_dtype()

    def get(self, name: str) -> torch.Tensor:
        return self.files[self.where[name]].get_tensor(name)

    def by_file(self) -> dict[str, list[str]]:
        """Tensor names grouped by the file that holds them."""
        groups: dict[str, list[str]] = {name: [] for name in self.files}
        for k, name in self.where.items():
            groups[name].append(k)
        return groups
