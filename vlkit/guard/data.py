"""Labelled conversations for guards, and the OpenAI moderation evaluation set.

A guard example: {"id", "messages": [...], "role": "User"|"Agent", "unsafe": [category names]}
(`unsafe` empty = safe). JSONL files of these are what recipe `guard` trains on.

OpenAI moderation (``samples-1680.jsonl.gz``: `prompt` + up to 8 binary labels S, H, V, HR, SH, S3,
H2, V2; an absent label is *unknown*). The split is deterministic and independent of file order:
a row is held out when int(sha256(prompt)[:8], 16) % 100 < 40 (about 40% test, 60% train). Texts are
never printed by vlkit (they are disturbing); only counts and scores are reported.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

from vlkit.errors import VlkitError
from vlkit.guard.taxonomy import OPENAI_MODERATION

MODERATION_FILE = "samples-1680.jsonl.gz"
LABELS = ("S", "H", "V", "HR", "SH", "S3", "H2", "V2")

CODE_NAME = dict(zip(LABELS, (c.name for c in OPENAI_MODERATION.categories)))  # label key -> category name


def is_test(text: str, percent: int = 40) -> bool:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) % 100 < percent


def load_moderation(path: str | Path) -> list[dict]:
    """Rows as {"id", "text", "labels": {code: 0|1 for the known labels}, "split": "train"|"test"}."""
    path = Path(path)
    if path.is_dir():
        path = path / MODERATION_FILE
    if not path.is_file():
        raise VlkitError(f"{path}: moderation data not found; point at ../shared/data/openai-moderation")
    rows = []
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                d = json.loads(line)
                if not isinstance(d.get("prompt"), str):
                    raise VlkitError(f"{path}: line {i + 1} has no 'prompt' string")
                labels = {k: int(d[k]) for k in LABELS if k in d and d[k] is not None}
                rows.append({"id": f"mod-{i:05d}", "text": d["prompt"], "labels": labels,
                             "split": "test" if is_test(d["prompt"]) else "train"})
    except (OSError, EOFError, json.JSONDecodeError, ValueError) as e:
        raise VlkitError(f"{path}: unreadable ({str(e)[:120]}); check the file") from None
    return rows


def any_unsafe(row: dict) -> int | None:
    """1 if any known label is 1; 0 if labels are known and all 0; None if nothing is known."""
    if not row["labels"]:
        return None
    return int(any(v == 1 for v in row["labels"].values()))


def to_example(row: dict) -> dict:
    """A guard example judged at the User: the moderation text as the user's message."""
    return {"id": row["id"], "role": "User", "messages": [{"role": "user", "content": row["text"]}],
            "unsafe": [CODE_NAME[k] for k in LABELS if row["labels"].get(k) == 1],
            "known": [CODE_NAME[k] for k in LABELS if k in row["labels"]]}


def read_examples(path: str | Path) -> list[dict]:
    from vlkit.fileio import read_jsonl

    out = read_jsonl(path)
    for i, ex in enumerate(out):
        if not isinstance(ex.get("messages"), list) or not ex["messages"]:
            raise VlkitError(f"{path}: record {ex.get('id', i)}: 'messages' must be a non-empty list")
        if ex.get("role", "User") not in ("User", "Agent"):
            raise VlkitError(f"{path}: record {ex.get('id', i)}: 'role' must be 'User' or 'Agent'")
        if not isinstance(ex.get("unsafe", []), list):
            raise VlkitError(f"{path}: record {ex.get('id', i)}: 'unsafe' must be a list of category names")
    return out
