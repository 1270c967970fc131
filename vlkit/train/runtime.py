"""Device, precision, seeding and the distributed context, kept in objects (no global state).

Under ``torchrun`` the environment names rank and world size; a process group is created once
per :class:`Runtime` and the model is wrapped in DDP by the trainer.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import torch

from vlkit.devices import resolve_device


@dataclass
class Runtime:
    device: torch.device
    autocast_dtype: torch.dtype | None
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def make_runtime(device: str = "auto", precision: str = "auto", num_threads: int | None = None) -> Runtime:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank, what="train.device")
    if num_threads:
        torch.set_num_threads(num_threads)
    if world_size > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            dist.init_process_group(backend=backend)
    return Runtime(dev, resolve_precision(precision, dev), rank, world_size, local_rank)


def seed_everything(seed: int) -> None:
    """Seed the generators the loop draws from (python, torch CPU and CUDA)."""
    random.seed(seed)
    torch.manual_seed(seed)
