"""Devices and dtypes as users name them: `--device auto|cpu|cuda|cuda:N|mps`, `--dtype auto|fp32|bf16|fp16`.

One place decides what a name means, so that training, loading, serving and the guard agree, and every bad name
gets the same one-line error (naming the setting it came from).
"""

from __future__ import annotations

import torch

from vlkit.errors import VlkitError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def resolve_device(name: str | torch.device = "auto", local_rank: int = 0, what: str = "device") -> torch.device:
    """auto: CUDA (this process's local rank) when there is one, else CPU; anything else must exist here."""
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise VlkitError(f"{what}: {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise VlkitError(f"{what}: {name!r} asks for CUDA, which this machine does not have; use auto or cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise VlkitError(f"{what}: {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise VlkitError(f"{what}: {name!r}: MPS is not available here; use auto or cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise VlkitError(f"{what}: {name!r} is not a device vlkit runs on; use auto, cpu, cuda, cuda:N or mps")
    return dev


def resolve_dtype(name: str | torch.dtype | None, what: str = "dtype") -> torch.dtype | None:
    """The torch dtype a name stands for; None or "auto": keep what the checkpoint stores (None)."""
    if name is None or isinstance(name, torch.dtype):
        if isinstance(name, torch.dtype) and name not in DTYPE_NAMES:
            raise VlkitError(f"{what}: {name} is not a floating dtype vlkit runs in; use fp32, bf16 or fp16")
        return name
    if name == "auto":
        return None
    if name not in DTYPES:
        raise VlkitError(f"{what}: {name!r} is not a dtype; use auto, fp32, bf16 or fp16")
    return DTYPES[name]


def check_dtype_on(dtype: torch.dtype | None, device: torch.device, what: str = "dtype") -> None:
    """Refuse a dtype the device cannot compute in (bf16 on a CUDA GPU older than Ampere)."""
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise VlkitError(f"{what}: bf16 is not supported on {torch.cuda.get_device_name(device)}; use fp16 or fp32")
