"""Records: one conversation with interleaved images (the shape every dataset is converted to).

    {"id": "vqa-000017", "task": "vqa", "images": ["img/000017.png"],
     "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]}

``{"type": "image"}`` parts consume ``images`` in order. Paths are relative to the JSONL file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from vlkit.errors import VlkitError
from vlkit.fileio import read_jsonl, write_jsonl

ROLES = ("system", "user", "assistant")


def user(*parts: str | None) -> dict:
    """A user message; None stands for an image part, a string for a text part."""
    return {"role": "user", "content": [{"type": "image"} if p is None else {"type": "text", "text": p}
                                        for p in parts]}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def count_image_parts(record: dict) -> int:
    return sum(1 for m in record["messages"] for p in _parts(m) if p.get("type") == "image")


def _parts(message: dict) -> list[dict]:
    content = message.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return content


def validate_record(record: dict, where: str = "record") -> None:
    """Raise a one-line error naming the record when it is not well formed."""
    rid = record.get("id", "?")
    if not isinstance(record.get("messages"), list) or not record["messages"]:
        raise VlkitError(f"{where} {rid}: 'messages' must be a non-empty list")
    for i, m in enumerate(record["messages"]):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise VlkitError(f"{where} {rid}: message {i} needs a role among {ROLES}")
        content = m.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise VlkitError(f"{where} {rid}: message {i} content must be a string or a list of parts")
        for p in content:
            if not isinstance(p, dict) or p.get("type") not in ("image", "text"):
                raise VlkitError(f"{where} {rid}: message {i} has a part that is neither text nor image")
            if p["type"] == "text" and not isinstance(p.get("text"), str):
                raise VlkitError(f"{where} {rid}: message {i} has a text part without a 'text' string")
    images = record.get("images", [])
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise VlkitError(f"{where} {rid}: 'images' must be a list of image paths (strings)")
    n = count_image_parts(record)
    if n != len(images):
        raise VlkitError(f"{where} {rid}: {n} image placeholders but {len(images)} images; "
                         "make the image parts and the 'images' list agree")


def load_records(path: str | Path) -> list[dict]:
    """Read and validate a JSONL of records; image paths become absolute."""
    path = Path(path)
    records = read_jsonl(path)
    base = str(path.parent.resolve())  # once per file: resolving every image path costs seconds on 25k records
    for lineno, r in enumerate(records, 1):
        checked(r, f"{path}:{lineno}", base)
    return records


def checked(record: dict, where: str, base: str) -> dict:
    """`record` validated (errors name `where`), its image paths made absolute against `base` (the JSONL file's
    resolved directory), in place."""
    validate_record(record, where)
    record["images"] = [p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p))
                        for p in record.get("images", [])]
    return record


def save_records(path: str | Path, records: Iterable[dict]) -> None:
    write_jsonl(path, records)


def message_text(message: dict, image_token: str | None = None) -> str:
    """The text of a message; image parts become `image_token` (or vanish when None)."""
    out = []
    for p in _parts(message):
        if p["type"] == "text":
            out.append(p["text"])
        elif image_token is not None:
            out.append(image_token)
    return "".join(out) if image_token is not None else " ".join(out)


def text_only(messages: list[dict]) -> list[dict]:
    """The conversation with image parts removed (for text-only training)."""
    out = []
    for m in messages:
        content = m["content"]
        if not isinstance(content, str):
            content = [p for p in content if p.get("type") != "image"]
        out.append({"role": m["role"], "content": content})
    return out
