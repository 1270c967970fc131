"""Where a recipe's records come from: the shapes world (the embedded default) or JSONL files of records."""

from __future__ import annotations

from pydantic import Field

from vlkit.config import Section
from vlkit.data.instructions import apply_named
from vlkit.data.records import load_records
from vlkit.data.tasks import mix_tasks
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
    instructions: str | None = Field(None, description="Task-specific instructions (SPHINX): a built-in set "
                                     "(sphinx, generic) or a YAML/JSON file of task -> template; rewrites each "
                                     "record's request in both splits, before mixing (vlkit.data.instructions). "
                                     "Held-out prompts at evaluation follow eval.instructions.")
    lazy: bool = Field(False, description="Read train records on demand and decode their images in the trainer's "
                       "DataLoader workers (train.num_workers) instead of holding every record and image in memory "
                       "(large data: memory stays flat in the record count). Needs cache_features=false; not with "
                       "data.mix.")


def load_splits(cfg: RecordsConfig, progress: bool | None = None) -> tuple[list[dict], list[dict]]:
    return load_split(cfg, "train", progress), load_split(cfg, "test", progress)


def load_split(cfg: RecordsConfig, split: str, progress: bool | None = None) -> list[dict]:
    """One split's records ("train" or "test"), filtered, capped, given `cfg.instructions` and (train) task-mixed
    as `cfg` says."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    path = getattr(cfg, split) or build(cfg.world, progress=progress) / f"{split}.jsonl"
    if cfg.lazy and split == "train":
        if cfg.mix:
            raise VlkitError("data.lazy: task mixing (data.mix) resamples records in memory; mix the JSONL "
                             "beforehand or set data.lazy=false")
        from vlkit.data.instructions import load_instructions
        from vlkit.data.lazy import RecordFile

        return RecordFile(path, cfg.tasks, cfg.max_train, cfg.instructions and load_instructions(cfg.instructions),
                          progress=progress)
    records = load_records(path)
    if cfg.tasks is not None:
        records = [r for r in records if r.get("task") in cfg.tasks]
    records = apply_named(records[: cfg.max_test if split == "test" else cfg.max_train], cfg.instructions)
    if split == "test":
        return records
    return mix_tasks(records, cfg.mix, seed=cfg.world.seed) if cfg.mix else records
