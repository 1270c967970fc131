"""Task mixing: resample records so that each task makes up its share of a training set."""

from __future__ import annotations

import random

from vlkit.errors import VlkitError


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
