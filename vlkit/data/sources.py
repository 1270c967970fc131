"""Where a recipe's records come from: the shapes world (default) or JSONL files of records."""

from __future__ import annotations

from pydantic import Field

from vlkit.config import Section
from vlkit.data.records import load_records
from vlkit.world.dataset import WorldData, build


class RecordsConfig(Section):
    """Train and held-out records. JSONL paths, when given, replace the world's splits."""

    world: WorldData = Field(default_factory=WorldData, description="The generated world dataset.")
    train: str | None = Field(None, description="JSONL of train records (instead of the world's train split).")
    test: str | None = Field(None, description="JSONL of held-out records (instead of the world's test split).")
    tasks: list[str] | None = Field(None, description="Keep only records of these tasks.")
    max_train: int | None = Field(None, gt=0, description="Use at most this many train records.")
    max_test: int | None = Field(None, gt=0, description="Use at most this many held-out records.")


def load_splits(cfg: RecordsConfig, progress: bool | None = None) -> tuple[list[dict], list[dict]]:
    root = build(cfg.world, progress=progress) if (cfg.train is None or cfg.test is None) else None
    train = load_records(cfg.train or root / "train.jsonl")
    test = load_records(cfg.test or root / "test.jsonl")
    if cfg.tasks is not None:
        train = [r for r in train if r.get("task") in cfg.tasks]
        test = [r for r in test if r.get("task") in cfg.tasks]
    return train[: cfg.max_train], test[: cfg.max_test]


def text_only(messages: list[dict]) -> list[dict]:
    """The conversation with image parts removed (for text-only training)."""
    out = []
    for m in messages:
        content = m["content"]
        if not isinstance(content, str):
            content = [p for p in content if p.get("type") != "image"]
        out.append({"role": m["role"], "content": content})
    return out
