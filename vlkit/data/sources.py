"""Where a recipe's records come from: the shapes world (default) or JSONL files of records."""

from __future__ import annotations

import random

from pydantic import Field

from vlkit.config import Section
from vlkit.data.records import load_records
from vlkit.errors import VlkitError
from vlkit.world.dataset import WorldData, build


class RecordsConfig(Section):
    """Train and held-out records. JSONL paths, when given, replace the world's splits."""

    world: WorldData = Field(default_factory=WorldData, description="The generated world dataset.")
    train: str | None = Field(None, description="JSONL of train records (instead of the world's train split).")
    test: str | None = Field(None, description="JSONL of held-out records (instead of the world's test split).")
    tasks: list[str] | None = Field(None, description="Keep only records of these tasks.")
    max_train: int | None = Field(None, gt=0, description="Use at most this many train records.")
    max_test: int | None = Field(None, gt=0, description="Use at most this many held-out records.")
    mix: dict[str, float] | None = Field(None, description="Task mixing: task -> weight; train records are "
                                         "resampled so each task makes up its share (same total).")


def load_splits(cfg: RecordsConfig, progress: bool | None = None) -> tuple[list[dict], list[dict]]:
    return load_split(cfg, "train", progress), load_split(cfg, "test", progress)


def load_split(cfg: RecordsConfig, split: str, progress: bool | None = None) -> list[dict]:
    """One split's records ("train" or "test"), filtered, capped and (train) task-mixed as `cfg` says."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    path = getattr(cfg, split) or build(cfg.world, progress=progress) / f"{split}.jsonl"
    records = load_records(path)
    if cfg.tasks is not None:
        records = [r for r in records if r.get("task") in cfg.tasks]
    if split == "test":
        return records[: cfg.max_test]
    records = records[: cfg.max_train]
    return mix_tasks(records, cfg.mix, seed=cfg.world.seed) if cfg.mix else records


def text_only(messages: list[dict]) -> list[dict]:
    """The conversation with image parts removed (for text-only training)."""
    out = []
    for m in messages:
        content = m["content"]
        if not isinstance(content, str):
            content = [p for p in content if p.get("type") != "image"]
        out.append({"role": m["role"], "content": content})
    return out


def mix_tasks(records: list[dict], weights: dict[str, float], seed: int = 0) -> list[dict]:
    """Resample records so that task t makes up weights[t] / sum(weights) of them (same total count).

    Tasks not named are dropped; a task with fewer records than its share is repeated (whole passes,
    then a seeded sample), one with more is subsampled. Deterministic for a seed."""
    by_task: dict[str, list[dict]] = {}
    for r in records:
        by_task.setdefault(r.get("task"), []).append(r)
    missing = [t for t, w in weights.items() if w > 0 and t not in by_task]
    if missing:
        raise VlkitError(f"data.mix: no records of task(s) {missing}; the records have {sorted(map(str, by_task))}")
    total_w = sum(w for w in weights.values() if w > 0)
    if total_w <= 0:
        raise VlkitError("data.mix: give at least one task a positive weight")
    kept = sum(len(v) for t, v in by_task.items() if weights.get(t, 0) > 0)
    rng = random.Random(seed)
    out: list[dict] = []
    for task, w in weights.items():
        if w <= 0:
            continue
        pool, n = by_task[task], round(kept * w / total_w)
        out += pool * (n // len(pool)) + rng.sample(pool, n % len(pool))
    rng.shuffle(out)
    return out
