"""Settings of the shared training loop (the `train:` section of every recipe config)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from vlkit.config import Section


class TrainConfig(Section):
    steps: int = Field(1000, gt=0, description="Optimiser steps to run in total.")
    batch_size: int = Field(32, gt=0, description="Examples per micro-batch (per rank).")
    grad_accum: int = Field(1, gt=0, description="Micro-batches accumulated per optimiser step.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate, reached after warm-up.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final LR of the cosine decay, as a fraction of lr.")
    warmup_steps: int = Field(50, ge=0, description="Linear warm-up steps from 0 to lr.")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="Decay after warm-up.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decoupled weight decay (not on norms and biases).")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.98, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0, description="Max global gradient norm; 0 disables clipping.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Autocast dtype; auto = bf16 on CUDA when supported, else fp32."
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, ...")
    parallel: Literal["ddp", "fsdp"] = Field("ddp", description="Under torchrun: ddp (every rank holds the whole "
                                             "model) or fsdp (PyTorch FSDP2: parameters, gradients and optimiser "
                                             "state sharded across ranks, one unit per decoder layer and per "
                                             "vision encoder; sharded checkpoints that resume on any number of "
                                             "ranks). One process: ignored.")
    activation_checkpointing: bool = Field(False, description="Recompute decoder layers' activations in the "
                                           "backward pass (less memory, ~30% more compute).")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes that read, decode and collate "
                             "batches ahead of the step (0: in the training process).")
    prefetch_factor: int = Field(2, gt=0, description="Batches each worker prepares ahead (num_workers > 0).")
    pin_memory: bool | None = Field(None, description="Pinned host memory for batches (default: on CUDA).")
    length_groups: int = Field(1, gt=0, description="VLM recipes: run each micro-batch as this many groups of "
                               "rows of similar length, each padded only to its own longest row: the same gradient "
                               "(up to float rounding) with less compute spent on padding (4: ~30% faster steps on "
                               "2 CPU cores with captions and short answers mixed).")
    batch_by_task: bool = Field(False, description="Draw every (global) batch from one task (LLaMA2-Accessory's "
                                "sampler for SPHINX): each epoch, each task's examples are shuffled and cut into "
                                "whole batches, and the batches of all tasks are shuffled together, so tasks come "
                                "in proportion to their example counts; a task with fewer examples than a global "
                                "batch is left out. Needs a dataset with `tasks` (the VLM recipes').")
    eval_every: int = Field(0, ge=0, description="Evaluate every N steps (0: only at the end).")
    save_every: int = Field(0, ge=0, description="Checkpoint every N steps (0: only at the end).")
    keep_checkpoints: int = Field(2, gt=0, description="How many recent checkpoints to keep.")
    log_every: int = Field(10, gt=0, description="Write a metrics line every N steps.")
    seed: int = Field(0, description="Seeds model init, data order and every random draw of the loop.")
    num_threads: int | None = Field(None, gt=0, description="torch CPU threads (default: torch's choice).")
    progress: bool | None = Field(None, description="Progress bar; default: only on a terminal.")
