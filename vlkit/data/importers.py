"""Import LLaVA- and ShareGPT-format conversations as vlkit records (`vlkit data import`).

Input: a JSON array (read incrementally: a 1 GB LLaVA file costs a chunk of memory, not the file) or JSONL of

    LLaVA pretrain and instruct (blip_laion_cc_sbu_558k.json, llava_v1_5_mix665k.json):
      {"id": "004539375", "image": "00453/004539375.jpg", "model": "...",
       "conversations": [{"from": "human", "value": "<image>\\nRender a clear and concise summary of the photo."},
                         {"from": "gpt", "value": "select luxury furniture 3 - inch gel memory foam mattress"}]}
      (instruct: several turns; records without "image" are text-only; "model" and other keys are ignored)
    multi-image (LLaVA-NeXT-Interleave, OneVision): "image": ["a.jpg", "b.jpg"], one <image> per image, in order
    ShareGPT: {"id": "i6IyJda_0", "conversations": [{"from": "system" | "human" | "gpt", "value": "..."}]}
    also accepted: "messages": [{"role": "system" | "user" | "assistant", "content": "..."}], "images": [...]
      and a record-level "system": "..." (LLaMA-Factory's sharegpt spelling)

Both formats go through one parser; FORMAT names the source and the default task of the records. Image paths
are relative to --images (default: the input's folder).

Output: vlkit records (`vlkit.data.records`), one a line, image paths relative to the output's folder:

    {"id": "004539375", "task": "llava", "images": ["../images/00453/004539375.jpg"],
     "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Render a ..."}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "select luxury ..."}]}]}

Each ``<image>`` becomes an image part where it stands; newlines next to it are dropped ("<image>\\nWhat is
it?" -> [image, "What is it?"], "What is it?\\n<image>" -> ["What is it?", image]); other text is verbatim.

Rules, in this order. A record that breaks one is skipped, counted under the reason with its first ids (the
import never stops on one record); an adjustment is counted the same way but the record is kept:

- malformed record: not an object; no non-empty conversations list; a turn that is not {from/role: str,
  value/content: str}; "image" neither a path nor a list of paths. invalid JSON line: JSONL only.
- unknown speaker: not human/user, gpt/assistant or system (any case). empty turn: no text and no image.
- image count mismatch: the ``<image>`` tokens differ in number from the images. Except, adjusted:
  "image token added": images but no token at all get one token per image at the start of the first human
  turn. LLaVA's trainer (preprocess_multimodal) moves every token to the start of its turn but adds none: its
  pretrain stage asserts the token and its instruct stage silently drops the features of an image without one.
  We add it where LLaVA would have moved it, so the image is trained on.
- "leading answer dropped" (adjusted): a conversation opening with gpt loses that turn, as LLaVA and FastChat
  do. "trailing question dropped" (adjusted): a last human turn has no answer; it goes, with its images.
- not alternating: after an optional first system turn, turns must go human, gpt, human, gpt, ...
- no answer: nothing left once trimmed.
- image missing: an image file not under --images (os.path.exists; --no-check-images skips the check).
- duplicate id: an id already written; the first record written with an id wins.
- "id assigned" (adjusted): a record without id is named by its position in the input, "#17" (0-based), which is
  also how skipped records without an id are listed.

Memory: records stream through one at a time; what grows with the input is the set of ids written (for the
duplicate check, about 100 bytes a record).
"""

from __future__ import annotations

import codecs
import json
import os
import re
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator

from vlkit.console import bar
from vlkit.data.records import validate_record
from vlkit.errors import VlkitError
from vlkit.fileio import atomic_path, write_json

FORMATS = ("llava", "sharegpt")
IMAGE_TOKEN = "<image>"
SPEAKERS = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
SHOWN_IDS = 5  # ids kept per reason in the summary
CHUNK_BYTES = 1 << 20
MAX_RECORD_CHARS = 64 << 20  # a JSON value longer than this is taken for a syntax error, so memory stays bounded
INVALID = object()  # what the JSONL reader yields for a line that is not JSON
_DECODER = json.JSONDecoder()


class Skip(Exception):
    """A record that cannot be imported; the message is the reason."""


# -- one record ---------------------------------------------------------------------------------------
def text_parts(text: str) -> list[dict]:
    """A turn's text -> parts, each ``<image>`` an image part in place, newlines next to it dropped."""
    pieces = text.split(IMAGE_TOKEN)
    parts = []
    for i, piece in enumerate(pieces):
        if i:
            parts.append({"type": "image"})
            piece = piece.lstrip("\r\n")
        if i < len(pieces) - 1:
            piece = piece.rstrip("\r\n")
        if piece.strip():
            parts.append({"type": "text", "text": piece})
    return parts


def _images_in(message: dict) -> int:
    return sum(p["type"] == "image" for p in message["content"])


def convert_record(raw: Any, index: int, task: str) -> tuple[dict, list[str]]:
    """One input record -> (vlkit record with its image paths as in the input, the adjustments made).

    Raises Skip(reason) for a record that cannot be imported (see the module docstring)."""
    if not isinstance(raw, dict):
        raise Skip("malformed record")
    notes = []
    rid = raw.get("id")
    if rid is None or rid == "":
        rid = f"#{index}"
        notes.append("id assigned")
    turns = raw.get("conversations", raw.get("messages"))
    images = raw.get("image", raw.get("images")) or []
    images = [images] if isinstance(images, str) else images
    if not isinstance(turns, list) or not turns or not isinstance(images, list) \
            or not all(isinstance(p, str) and p for p in images):
        raise Skip("malformed record")
    messages = []
    if isinstance(raw.get("system"), str) and raw["system"].strip():
        messages.append({"role": "system", "content": text_parts(raw["system"])})
    for turn in turns:
        speaker = turn.get("from", turn.get("role")) if isinstance(turn, dict) else None
        value = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
        if not isinstance(speaker, str) or not isinstance(value, str):
            raise Skip("malformed record")
        if speaker.lower() not in SPEAKERS:
            raise Skip("unknown speaker")
        parts = text_parts(value)
        if not parts:
            raise Skip("empty turn")
        messages.append({"role": SPEAKERS[speaker.lower()], "content": parts})

    tokens = sum(_images_in(m) for m in messages)
    add_tokens = bool(images) and tokens == 0
    if tokens != len(images) and not add_tokens:
        raise Skip("image count mismatch")
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    head = tail = 0
    if turns and turns[0]["role"] == "assistant":
        head, turns = _images_in(turns[0]), turns[1:]
        notes.append("leading answer dropped")
    if turns and turns[-1]["role"] == "user":
        tail, turns = _images_in(turns[-1]), turns[:-1]
        notes.append("trailing question dropped")
    if not turns:
        raise Skip("no answer")
    if [m["role"] for m in turns] != ["user", "assistant"] * (len(turns) // 2):
        raise Skip("not alternating")
    images = images[head:len(images) - tail]
    if add_tokens:
        turns[0] = {"role": "user", "content": [{"type": "image"} for _ in images] + turns[0]["content"]}
        notes.append("image token added")
    return {"id": str(rid), "task": task, "images": images, "messages": system + turns}, notes


# -- reading ------------------------------------------------------------------------------------------
class _Text:
    """A window on text arriving in pieces: `buf[pos:]` is what is not consumed yet."""

    NONBLANK = re.compile(r"\S")

    def __init__(self, pieces: Iterable[str], where: str):
        self.pieces, self.where = iter(pieces), where
        self.buf, self.pos, self.offset, self.eof = "", 0, 0, False

    def more(self) -> bool:
        """Append the next piece, dropping what was consumed; False at the end of the input."""
        piece = next(self.pieces, None)
        if piece is None:
            self.eof = True
            return False
        self.offset += self.pos
        self.buf, self.pos = self.buf[self.pos:] + piece, 0
        return True

    def peek(self) -> str:
        """The next non-blank character, not consumed ('' at the end of the input)."""
        while True:
            m = self.NONBLANK.search(self.buf, self.pos)
            if m:
                self.pos = m.start()
                return self.buf[self.pos]
            self.pos = len(self.buf)
            if not self.more():
                return ""

    def value(self) -> Any:
        """Decode the JSON value that starts here; read more while it may be cut off by the window's end."""
        while True:
            try:
                obj, end = _DECODER.raw_decode(self.buf, self.pos)
                # a number may go on in the next piece: "12" of "12345", "-0.5" of "-0.5e10"
                cut = end == len(self.buf) or type(obj) in (int, float) and self.buf[end] in "0123456789.eE+-"
                if not cut or self.eof or len(self.buf) - self.pos > MAX_RECORD_CHARS:
                    self.pos = end
                    return obj
            except json.JSONDecodeError as e:
                if self.eof or len(self.buf) - self.pos > MAX_RECORD_CHARS:
                    raise self.error(e.msg, e.pos) from None
            self.more()

    def error(self, msg: str, pos: int | None = None) -> VlkitError:
        at = self.offset + (self.pos if pos is None else pos)
        return VlkitError(f"{self.where}: not valid JSON at character {at} ({msg}); fix or regenerate the file")


def iter_json_array(pieces: Iterable[str], where: str = "input") -> Iterator[Any]:
    """The elements of a JSON array whose text arrives in `pieces`, one at a time (same values as json.load)."""
    text = _Text(pieces, where)
    if text.peek() != "[":
        raise text.error("expected '[' to open the array")
    text.pos += 1
    if text.peek() == "]":
        text.pos += 1
    else:
        while True:
            if text.peek() == "":
                raise text.error("the input ends inside the array")
            yield text.value()
            c = text.peek()
            text.pos += 1
            if c == "":
                raise text.error("the input ends inside the array")
            if c == "]":
                break
            if c != ",":
                raise text.error("expected ',' or ']' after an element", text.pos - 1)
    if text.peek() != "":
        raise text.error("extra data after the array")


def _text_pieces(f: BinaryIO, chunk_bytes: int, on_bytes: Callable[[int], Any]) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    while True:
        block = f.read(chunk_bytes)
        on_bytes(len(block))
        yield decoder.decode(block, final=not block)
        if not block:
            return


def _iter_jsonl(f: BinaryIO, where: str, on_bytes: Callable[[int], Any]) -> Iterator[Any]:
    """Objects of a JSONL file, INVALID for a bad line; a bad first line means the file is not JSONL."""
    first = True
    for lineno, line in enumerate(f, 1):
        on_bytes(len(line))
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            if first:
                raise VlkitError(f"{where}:{lineno}: not valid JSON ({e}); give a JSON array of records or JSONL "
                                 "(one record a line)") from None
            yield INVALID
        first = False


def read_records(f: BinaryIO, where: str, chunk_bytes: int = CHUNK_BYTES,
                 on_bytes: Callable[[int], Any] = lambda n: None) -> Iterator[Any]:
    """The records of a JSON array or JSONL file opened in binary, streamed; `on_bytes` hears of bytes read."""
    start = f.read(1 << 16).decode("utf-8-sig", "ignore").lstrip()
    f.seek(0)
    if not start:
        raise VlkitError(f"{where}: the file is empty; give a JSON array of records or JSONL")
    if start[0] == "[":
        return iter_json_array(_text_pieces(f, chunk_bytes, on_bytes), where)
    if start[0] == "{":
        return _iter_jsonl(f, where, on_bytes)
    raise VlkitError(f"{where}: neither a JSON array nor JSONL (it starts with {start[:12]!r}); give LLaVA or "
                     "ShareGPT data")


# -- the import ---------------------------------------------------------------------------------------
def summary_path(out: str | os.PathLike) -> Path:
    """Where the import summary of `out` goes: records.jsonl -> records.import.json."""
    return Path(out).with_suffix(".import.json")


def _tally(table: dict, reason: str, rid: str) -> None:
    entry = table.setdefault(reason, {"count": 0, "ids": []})
    entry["count"] += 1
    if len(entry["ids"]) < SHOWN_IDS:
        entry["ids"].append(rid)


def import_file(fmt: str, source: str | os.PathLike, out: str | os.PathLike, images: str | os.PathLike | None = None,
                task: str | None = None, check_images: bool = True, overwrite: bool = False,
                progress: bool | None = None, chunk_bytes: int = CHUNK_BYTES) -> dict:
    """Convert `source` (FORMAT `fmt`) to records at `out` and the summary beside it; returns the summary:

    {"format", "task", "input", "output", "images", "read", "written",
     "skipped": {reason: {"count": n, "ids": [first ids]}}, "adjusted": {reason: {"count", "ids"}}}

    A problem with the input as a whole is a VlkitError and leaves nothing written."""
    source, out = Path(source), Path(out)
    if fmt not in FORMATS:
        raise VlkitError(f"format {fmt!r} is unknown; choose one of {', '.join(FORMATS)}")
    if not source.is_file():
        raise VlkitError(f"{source}: file not found; check the path")
    root = Path(images) if images is not None else source.parent
    if not root.is_dir():
        raise VlkitError(f"--images {root}: not a directory; give the folder the image paths are relative to")
    if source.resolve() in (out.resolve(), summary_path(out).resolve()):
        raise VlkitError(f"--out {out}: that would overwrite the input {source}; write the records elsewhere")
    if out.is_dir():
        raise VlkitError(f"--out {out}: is a directory; give the records file to write, e.g. {out / 'records.jsonl'}")
    if out.exists() and not overwrite:
        raise VlkitError(f"{out}: already exists; pass --overwrite to replace it")
    root = root.resolve()
    out_dir = out.parent.resolve()
    try:
        prefix = os.path.relpath(root, out_dir)
    except ValueError:  # another drive (Windows): absolute paths
        prefix = str(root)
    task = task or fmt
    s = {"format": fmt, "task": task, "input": str(source), "output": str(out), "images": str(root),
         "read": 0, "written": 0, "skipped": {}, "adjusted": {}}
    written_ids: set[str] = set()
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f, open(source, "rb") as src, \
            bar(desc=f"import {source.name}", total=source.stat().st_size, enabled=progress, unit="B",
                unit_scale=True) as pbar:
        try:
            for index, raw in enumerate(read_records(src, str(source), chunk_bytes, pbar.update)):
                s["read"] += 1
                rid = str(raw["id"]) if isinstance(raw, dict) and raw.get("id") not in (None, "") else f"#{index}"
                try:
                    if raw is INVALID:
                        raise Skip("invalid JSON line")
                    record, notes = convert_record(raw, index, task)
                    if check_images and not all(os.path.exists(os.path.join(root, p)) for p in record["images"]):
                        raise Skip("image missing")
                    if record["id"] in written_ids:
                        raise Skip("duplicate id")
                    record["images"] = [p if os.path.isabs(p) else os.path.normpath(os.path.join(prefix, p))
                                        for p in record["images"]]
                    try:
                        validate_record(record, str(source))
                    except VlkitError:
                        raise Skip("invalid record") from None
                except Skip as e:
                    _tally(s["skipped"], str(e), rid)
                    continue
                for note in notes:
                    _tally(s["adjusted"], note, record["id"])
                written_ids.add(record["id"])
                f.write(json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n")
                s["written"] += 1
        except UnicodeDecodeError as e:
            raise VlkitError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start} of a chunk); "
                             "re-encode it as UTF-8") from None
        unreadable = sum(s["skipped"].get(r, {}).get("count", 0) for r in ("malformed record", "invalid JSON line"))
        if s["read"] == 0:
            raise VlkitError(f"{source}: holds no records; nothing to import")
        if s["written"] == 0 and unreadable == s["read"]:
            raise VlkitError(f"{source}: no record is an object with 'conversations' (or 'messages'); give LLaVA or "
                             "ShareGPT data: a JSON array or JSONL of such records")
    write_json(summary_path(out), s)
    return s


def summary_text(s: dict) -> str:
    """The summary as the command prints it: records written, then skips and adjustments by reason."""
    skipped = sum(e["count"] for e in s["skipped"].values())
    lines = [f"wrote {s['written']} records to {s['output']} (read {s['read']}, skipped {skipped})"]
    for key in ("skipped", "adjusted"):
        if s[key]:
            lines.append(f"{key}:")
        for reason, e in sorted(s[key].items(), key=lambda kv: (-kv[1]["count"], kv[0])):
            more = ", ..." if e["count"] > len(e["ids"]) else ""
            lines.append(f"  {reason}: {e['count']} ({', '.join(e['ids'])}{more})")
    lines.append(f"summary: {summary_path(s['output'])}")
    return "\n".join(lines)
