"""Processes: wrapping a model for data parallelism, and saving with one writer.

Under ``torchrun`` every rank runs the same recipe. The trainer wraps the model here once (DDP: every rank
holds a full copy, gradients are averaged across ranks). Saving is collective: every rank calls
`save_once` (gathering a full state from sharded ranks, which a later FSDP path needs, takes them all),
rank 0 alone writes the directory, atomically, and every rank learns whether that write succeeded. No
recipe carries rank logic of its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from torch import nn

from vlkit.errors import VlkitError
from vlkit.fileio import atomic_dir
from vlkit.train.runtime import Runtime


def wrap(model: nn.Module, rt: Runtime) -> nn.Module:
    """The module the training loop calls: the model itself on one process, DDP around it on several."""
    if not rt.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [rt.device.index] if rt.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def save_once(rt: Runtime, directory: str | Path, write: Callable[[Path], None],
              then: Callable[[], None] | None = None) -> Path:
    """Every rank calls this; rank 0 runs `write(tmp)` into a temporary directory that then replaces
    `directory` (and `then()` once it is in place); the other ranks wait for it. A failed write is an error on
    every rank."""
    directory = Path(directory)
    error = None
    if rt.is_main:
        try:
            with atomic_dir(directory) as tmp:
                write(tmp)
            if then is not None:
                then()
        except Exception as e:  # told to every rank below, then raised here as it was
            error = e
    if rt.distributed:
        import torch.distributed as dist

        status = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(status, src=0)
        if status[0] is not None and error is None:
            raise VlkitError(f"{directory}: rank 0 could not write it ({status[0]})")
    if error is not None:
        raise error
    return directory
