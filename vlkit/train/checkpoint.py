"""Atomic training checkpoints with everything exact resume needs.

Layout of ``<out>/checkpoints/step-000300/``:
    trainable.safetensors   parameters that are trained (frozen parts are rebuilt by the recipe)
    optimizer.pt            optimiser state (tensors and numbers only; loaded with weights_only=True)
    rng.safetensors         torch CPU (and CUDA) generator states
    state.json              step, python RNG state, the config, recent metrics (written last)
A sharded run (FSDP2) writes instead, every rank its part:
    dcp/                    trained parameters and optimiser state, `torch.distributed.checkpoint` format (keyed by
                            parameter name, so it loads on any number of ranks, one included)
    rng-<rank>.safetensors  each rank's generator states
``<out>/checkpoints/latest`` names the newest complete one; it is replaced only after the
directory is complete, so a crash mid-write leaves the previous checkpoint in force.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vlkit.errors import VlkitError
from vlkit.fileio import read_json, write_text


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def load_safetensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing or corrupt file is a one-line error naming it."""
    path = Path(path)
    if not path.is_file():
        raise VlkitError(f"{path}: weights file not found; check the path or re-run the training stage")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise VlkitError(f"{path}: corrupt or truncated safetensors ({str(e).splitlines()[0]}); "
                         "delete it and re-run the stage that wrote it") from None


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def write_checkpoint(tmp: Path, step: int, trainable: dict[str, torch.Tensor], optimizer_state: dict,
                     extra: dict[str, Any]) -> None:
    """The files of one checkpoint, written into the (temporary) directory `tmp`."""
    save_file(trainable, str(tmp / "trainable.safetensors"))
    torch.save(optimizer_state, tmp / "optimizer.pt")
    _write_rng(tmp / "rng.safetensors")
    _write_state(tmp, step, extra)


def _write_rng(path: Path) -> None:
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda{i}"] = s
    save_file(rng, str(path))


def _write_state(tmp: Path, step: int, extra: dict[str, Any]) -> None:
    state = {"step": step, "python_rng": _py_rng_to_json(random.getstate()), **extra}
    (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True, default=str))


def _dcp_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=False)


def write_sharded_checkpoint(tmp: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                             extra: dict[str, Any], rank: int) -> None:
    """Every rank's part of a sharded checkpoint (collective: every rank calls it with the same `tmp`)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optim = get_state_dict(model, optimizer, options=_dcp_options())
    dcp.save({"model": weights, "optim": optim}, checkpoint_id=str(tmp / "dcp"))
    _write_rng(tmp / f"rng-{rank}.safetensors")
    if rank == 0:
        _write_state(tmp, step, extra)


def _load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> None:
    """Trained parameters and optimiser state of a `dcp/` checkpoint, into a model sharded any way or not at
    all (the parameter names say where each tensor goes)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    weights, optim = get_state_dict(model, optimizer, options=_dcp_options())
    try:
        saved = {k[len("model."):] for k in dcp.FileSystemReader(str(path / "dcp")).read_metadata().state_dict_metadata
                 if k.startswith("model.")}
    except Exception as e:  # any unreadable metadata: name the file
        raise VlkitError(f"{path / 'dcp'}: unreadable sharded checkpoint ({str(e).splitlines()[0][:160]}); delete "
                         "this checkpoint directory to fall back to an earlier one") from None
    if saved != set(weights):
        missing, extra = sorted(set(weights) - saved)[:3], sorted(saved - set(weights))[:3]
        raise VlkitError(f"{path}: checkpoint does not match the model (missing {missing}, unexpected {extra}); "
                         "resume with the config that wrote it")
    state = {"model": weights, "optim": optim}
    with warnings.catch_warnings():  # one process reading a sharded checkpoint: what it is for
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        dcp.load(state, checkpoint_id=str(path / "dcp"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_dcp_options())


def publish(ckpt_root: Path, name: str, keep: int) -> None:
    """Point `latest` at a complete checkpoint, then prune: the newest `keep` stay. A pruned checkpoint is first
    renamed out of the `step-*` namespace (one atomic rename), so a kill while it is deleted never leaves a
    `step-*` directory without its weights."""
    write_text(ckpt_root / "latest", name + "\n")
    done = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
    for old in done[:-keep]:
        doomed = old.with_name(f".{old.name}.deleting")
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def clean_temporaries(ckpt_root: Path) -> None:
    """Remove what a killed run left half-done: checkpoints being written (`.step-*.tmp`, `.step-*.old-*`) or
    pruned (`.step-*.deleting`), and `step-*` directories without their weights file."""
    if not ckpt_root.is_dir():
        return
    for p in ckpt_root.iterdir():
        stale = p.name.startswith(".step-") or (p.name.startswith("step-") and p.is_dir()
                                                and not (p / "state.json").is_file())
        if stale:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    pointer = ckpt_root / "latest"
    if not pointer.is_file():
        return None
    path = ckpt_root / pointer.read_text().strip()
    if not path.is_dir():
        raise VlkitError(f"{pointer}: names {path.name}, which is missing; delete {pointer} to start over")
    return path


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int = 0
                    ) -> dict[str, Any]:
    """Restore model trainables, optimiser and RNG states in place; return state.json."""
    if (path / "dcp").is_dir():
        _load_sharded(path, model, optimizer, rank)
        rng_file = path / f"rng-{rank}.safetensors"
        return _restore_rng(path, rng_file if rng_file.is_file() else path / "rng-0.safetensors")
    weights = load_safetensors(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != expected:
        missing = sorted(expected - set(weights))[:3]
        extra = sorted(set(weights) - expected)[:3]
        raise VlkitError(f"{path}: checkpoint does not match the model (missing {missing}, unexpected {extra}); "
                         "resume with the config that wrote it")
    wrong = [(n, tuple(t.shape), tuple(params[n].shape)) for n, t in weights.items() if t.shape != params[n].shape]
    if wrong:
        n, saved, now = wrong[0]
        raise VlkitError(f"{path}: checkpoint of another model size ({n}: {saved} saved, {now} now); resume with "
                         "the config that wrote it")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)
    opt_file = path / "optimizer.pt"
    try:
        optimizer.load_state_dict(torch.load(opt_file, map_location="cpu", weights_only=True))
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise VlkitError(f"{opt_file}: unreadable optimiser state ({str(e).splitlines()[0]}); "
                         "delete this checkpoint directory to fall back to an earlier one") from None
    return _restore_rng(path, path / "rng.safetensors")


def _restore_rng(path: Path, rng_file: Path) -> dict[str, Any]:
    rng = load_safetensors(rng_file)
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
        if states:
            torch.cuda.set_rng_state_all(states)
    state = read_json(path / "state.json")
    random.setstate(_py_rng_from_json(state["python_rng"]))
    return state


def _py_rng_to_json(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _py_rng_from_json(data):
    version, internal, gauss = data
    return (version, tuple(internal), gauss)
