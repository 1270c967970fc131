"""Processes: wrapping a model for data parallelism, and saving with one writer or with every rank.

Under ``torchrun`` every rank runs the same recipe. The trainer wraps the model here once:
- DDP (`train.parallel: ddp`, the default): every rank holds a full copy, gradients are averaged across ranks
  (not synchronised on the micro-batches of an accumulation before the last: `no_sync`).
- FSDP2 (`train.parallel: fsdp`): PyTorch's `fully_shard`, one unit per LLM decoder layer and one per vision
  encoder (frozen towers too: their shards are gathered only while they run), the rest (embeddings, head, VPG,
  fusions) in the root unit. Parameters stay sharded in fp32; with bf16 precision they are gathered in bf16 for
  compute and gradients are reduced in fp32 (`MixedPrecisionPolicy`).

Saving is collective: every rank calls `save_once` (rank 0 alone writes the directory, atomically, and every
rank learns whether that write succeeded) or `save_together` (every rank writes its part of a sharded
checkpoint into one temporary directory on a shared filesystem; rank 0 publishes it). No recipe carries rank
logic of its own.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from vlkit.errors import VlkitError
from vlkit.fileio import atomic_dir, replace_dir, temp_dir_beside
from vlkit.train.runtime import Runtime


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards one by one: each decoder layer of the LLM and each vision encoder (a model may say
    otherwise with a `shard_units()` method)."""
    if hasattr(model, "shard_units"):
        return list(model.shard_units())
    from vlkit.models.llm import decoder_layers

    return list(decoder_layers(model))


def checkpoint_activations(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them (HF's gradient
    checkpointing, non-reentrant, so it composes with FSDP2 and frozen inputs)."""
    llm = getattr(model, "llm", model)
    if not getattr(llm, "supports_gradient_checkpointing", False):
        raise VlkitError(f"train.activation_checkpointing: {type(llm).__name__} does not support it; set it false")
    llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(llm, "config"):
        llm.config.use_cache = False


def wrap(model: nn.Module, rt: Runtime, parallel: str = "ddp", compute_dtype: torch.dtype | None = None,
         unused_parameters: bool = False) -> nn.Module:
    """The module the training loop calls: the model itself on one process, DDP around it on several (told when
    some trainable parameters get no gradient in a step: `unused_parameters`); under FSDP the model itself, sharded
    in place."""
    if not rt.distributed:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32 if compute_dtype else None)
        for unit in shard_units(model):
            fully_shard(unit, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [rt.device.index] if rt.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=unused_parameters)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def no_sync(wrapped: nn.Module, last: bool):
    """DDP: skip the gradient all-reduce on every micro-batch of an accumulation but the last (the gradients
    add up locally; the last backward reduces their sum). FSDP2 and one process: nothing to skip here."""
    if last or not hasattr(wrapped, "no_sync"):
        return contextlib.nullcontext()
    return wrapped.no_sync()


def full_state(model: nn.Module, rt: Runtime) -> dict[str, torch.Tensor] | None:
    """Every tensor of a sharded model gathered in full, on the CPU of rank 0 (None elsewhere and for a model
    that is not sharded). Collective: every rank calls it."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if rt.is_main else None


def _agree(rt: Runtime, error: Exception | None, directory: Path) -> None:
    """Tell every rank whether each rank's part succeeded; raise on every rank if one failed."""
    if not rt.distributed:
        if error is not None:
            raise error
        return
    import torch.distributed as dist

    statuses: list = [None] * rt.world_size
    dist.all_gather_object(statuses, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, s) for r, s in enumerate(statuses) if s is not None]
    if failed:
        r, s = failed[0]
        raise VlkitError(f"{directory}: rank {r} could not write {'it' if r == 0 else 'its part'} ({s})")


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
        except Exception as e:  # told to every rank, then raised here as it was
            error = e
    _agree(rt, error, directory)
    return directory


def save_together(rt: Runtime, directory: str | Path, write: Callable[[Path], None],
                  then: Callable[[], None] | None = None) -> Path:
    """Every rank runs `write(tmp)` (which may be collective: `torch.distributed.checkpoint.save`) into one
    temporary directory beside `directory` (the ranks share a filesystem); once every rank's part is in, rank 0
    renames it to `directory` and runs `then()`. A failure on any rank is an error on every rank and leaves
    `directory` as it was."""
    directory = Path(directory)
    made: list = [None]
    if rt.is_main:
        try:
            made = [("ok", str(temp_dir_beside(directory)))]
        except OSError as e:
            made = [("error", f"{directory.parent}: cannot create a directory there ({e})")]
    if rt.distributed:
        import torch.distributed as dist

        dist.broadcast_object_list(made, src=0)
    status, where = made[0]
    if status == "error":  # rank 0 could not make it: every rank says so
        raise VlkitError(where)
    tmp = Path(where)
    error = None
    try:
        write(tmp)
        (tmp / f".rank-{rt.rank}").touch()  # this rank's part is in
    except Exception as e:
        error = e
    try:
        _agree(rt, error, directory)
        if rt.is_main:  # every rank's part must be where rank 0 publishes it
            absent = [r for r in range(rt.world_size) if not (tmp / f".rank-{r}").is_file()]
            error = VlkitError(f"{directory}: the parts of rank(s) {absent} are not in {tmp}: the ranks must share "
                               "one filesystem for output_dir") if absent else None
            for r in range(rt.world_size):
                (tmp / f".rank-{r}").unlink(missing_ok=True)
        _agree(rt, error, directory)
        error = None
        if rt.is_main:
            try:
                replace_dir(tmp, directory)
                if then is not None:
                    then()
            except Exception as e:
                error = e
        _agree(rt, error, directory)
    finally:
        if rt.is_main and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory
