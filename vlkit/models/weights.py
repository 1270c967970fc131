"""A model directory's safetensors weights, one file or sharded (`model.safetensors.index.json`), read from their
headers and one tensor at a time: what weight mixing (merge.py) and partial loads (BLIP-2's Q-Former) need
without building a model."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from vlkit.errors import VlkitError
from vlkit.fileio import read_json

WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"


class Weights:
    """A directory's safetensors weights, one file or sharded: names, shapes and dtypes from the headers, tensors
    read one at a time."""

    def __init__(self, directory: Path):
        self.directory = directory
        index = directory / INDEX
        if index.is_file():
            meta = read_json(index)
            weight_map = meta.get("weight_map") if isinstance(meta, dict) else None
            if not isinstance(weight_map, dict):
                raise VlkitError(f"{index}: no weight_map; re-save the model")
        elif (directory / WEIGHTS).is_file():
            weight_map = None
        else:
            raise VlkitError(f"{directory}: no safetensors weights ({WEIGHTS} or {INDEX}); save the model with "
                             "safetensors")
        self.files = {}
        for name in sorted(set(weight_map.values())) if weight_map else [WEIGHTS]:
            try:
                self.files[name] = safe_open(str(directory / name), "pt")
            except (SafetensorError, OSError) as e:
                raise VlkitError(f"{directory / name}: unreadable weights ({str(e).splitlines()[0][:120]}); "
                                 "re-save the model") from None
        self.where = {k: name for name, f in self.files.items() for k in f.keys()}
        if weight_map and set(weight_map) != set(self.where):
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
