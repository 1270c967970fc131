"""Task-specific instructions (SPHINX, Lin et al. 2023, sec 3.2): one prompt template per task, so that the
model learns from the wording which output a request wants (a word, a box, a sentence) instead of guessing.

An instruction set (`Instructions`) maps a task to a template with ``{fields}``. `apply` rewrites the request of
every record -- the last user turn before the final assistant turn -- from its task's template, filling the
fields from the record (`slots`). Built-in sets: `sphinx` (SPHINX's wording) and `generic` (every record keeps
its own request: the baseline of "task-specific vs one generic instruction"); any other set is a YAML or JSON
file of ``task: template`` lines, with ``default: keep`` to let tasks without a template keep their request.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from vlkit.config import read_yaml
from vlkit.data.records import message_text
from vlkit.errors import VlkitError

# The fields a template may name, and where `slots` finds them: the record's request, a referring expression
# (refer), the kind of object to find (detect) or of question (world vqa).
FIELDS = ("question", "expr", "kind")
# What a task's template must name so the rewritten request still says what is asked: the question of a vqa
# record, the expression to locate, the kind to detect. Other tasks' requests carry nothing record-specific.
NEEDS: dict[str, tuple[str, ...]] = {"vqa": ("question",), "grounding": ("question",), "refer": ("expr",),
                                     "detect": ("kind",)}


def template_fields(template: str) -> list[str]:
    """The field names a template uses, in order ("{{" and "}}" are literal braces)."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def _check_template(where: str, task: str, template: str) -> None:
    if not isinstance(template, str):
        raise VlkitError(f"{where}: key {task!r} must be a template string, not {type(template).__name__}")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise VlkitError(f"{where}: key {task!r}: malformed template ({e}); write literal braces as {{{{ }}}}") \
            from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in FIELDS or spec or conversion:
            raise VlkitError(f"{where}: key {task!r}: unknown field {{{name}}}; templates may use "
                             f"{', '.join('{' + f + '}' for f in FIELDS)}")
    missing = [f for f in NEEDS.get(task, ()) if f not in template_fields(template)]
    if missing:
        raise VlkitError(f"{where}: key {task!r}: the template lacks {{{missing[0]}}}, so the rewritten request "
                         "would not say what is asked; add it")


@dataclass(frozen=True)
class Instructions:
    """A named instruction set: task -> template. `keep_others`: records of a task without a template keep their
    request (else they are an error). `source` names where the set came from, for errors."""

    name: str
    templates: Mapping[str, str] = field(default_factory=dict)
    keep_others: bool = False
    source: str = ""

    def __post_init__(self):
        for task, template in self.templates.items():
            _check_template(self.source or self.name, task, template)

    def render(self, record: dict) -> str | None:
        """The new request of `record`, or None where it keeps its own."""
        task = record.get("task")
        if task not in self.templates:
            if self.keep_others:
                return None
            raise VlkitError(f"{self.source}: no template for task {task!r} (record {record.get('id', '?')}); "
                             "add a key for it or 'default: keep'")
        values = slots(record)
        for name in template_fields(self.templates[task]):
            if name not in values:
                raise VlkitError(f"{self.source}: key {task!r} needs field {name!r}, which record "
                                 f"{record.get('id', '?')} lacks; give the record meta[{name!r}] or meta['slots']")
        return self.templates[task].format_map(values)


# SPHINX's verbatim wording: vqa, refer and grounded (grounded captioning). caption is SPHINX's short-caption
# request (its grounded one without the box clause). Ours, in SPHINX's style: text, smalltext and detect (one
# imperative line that says the answer's form), and grounding, whose world records already name their target.
# Tasks SPHINX has no counterpart for (world class, edit) keep their own request.
SPHINX = Instructions("sphinx", {
    "vqa": "{question}\nAnswer the question using a single word or phrase.",
    "refer": "Please provide the bounding box coordinate of the region this sentence describes: {expr}.",
    "grounded": "Describe the image concisely. Include the bounding box for each mentioned object.",
    "caption": "Describe the image concisely.",
    "text": "What is the text in the image? Answer with the text only.",
    "smalltext": "What is the small text in the image? Answer with the text only.",
    "detect": "Detect all the {kind} in the image and give their bounding boxes.",
    "grounding": "{question}",
}, keep_others=True, source="built-in instruction set 'sphinx'")
GENERIC = Instructions("generic", {}, keep_others=True, source="built-in instruction set 'generic'")
BUILTIN: dict[str, Instructions] = {s.name: s for s in (SPHINX, GENERIC)}


def load_instructions(spec: str) -> Instructions:
    """A built-in set by name, else a YAML/JSON file of ``task: template`` (and optionally ``default: keep``),
    named by its file stem."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    path = Path(spec)
    if not path.is_file():
        raise VlkitError(f"{spec}: neither a built-in instruction set ({', '.join(BUILTIN)}) nor a file; "
                         "check the name or path")
    data = dict(read_yaml(path))
    default = data.pop("default", "error")
    if default not in ("keep", "error"):
        raise VlkitError(f"{path}: key 'default' must be 'keep' or 'error', not {default!r}")
    for task in data:
        if not isinstance(task, str) or not task.isidentifier():
            raise VlkitError(f"{path}: key {task!r} is not a task name; keys are tasks (letters, digits, _)")
    return Instructions(path.stem, data, keep_others=default == "keep", source=str(path))


def slots(record: dict) -> dict:
    """A record's template fields: meta["slots"] when it has them (the world's records of every SPHINX task do), else
    {"question": the request's text (as it was before any instruction set rewrote it)} plus meta's `expr` where
    present (meta's `kind` is not taken: a world VQA record's is its question kind, not a detection class)."""
    meta = record.get("meta") or {}
    if isinstance(meta.get("slots"), dict):
        return dict(meta["slots"])
    _, user = _request(record)
    out = {"question": meta.get("request", message_text(record["messages"][user]) if user is not None else "")}
    out.update({k: meta[k] for k in ("expr",) if k in meta})
    return out


def _request(record: dict) -> tuple[int | None, int | None]:
    """(final assistant turn, last user turn before it); None where there is none."""
    msgs = record["messages"]
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
    user = max((i for i, m in enumerate(msgs[:last]) if m["role"] == "user"), default=None)
    return last, user


def apply(records: list[dict], instructions: Instructions) -> list[dict]:
    """New records whose request follows `instructions`; the input is left as it was.

    The request is the last user turn before the final assistant turn; its text parts become one part holding
    the rendered template, in the place of the first (image parts stay where they are). A rewritten record
    carries meta["instruction"] (the set's name) and meta["request"] (its original text, so that applying a
    set again starts from it: applying twice equals applying once)."""
    out = []
    for r in records:
        text = instructions.render(r)
        _, user = _request(r)
        if text is None or user is None:
            out.append(r)
            continue
        msgs = list(r["messages"])
        msgs[user] = {**msgs[user], "content": _replace_text(msgs[user]["content"], text)}
        meta = dict(r.get("meta") or {})
        meta.setdefault("request", message_text(r["messages"][user]))
        meta["instruction"] = instructions.name
        out.append({**r, "messages": msgs, "meta": meta})
    return out


def _replace_text(content: str | list[dict], text: str) -> str | list[dict]:
    if isinstance(content, str):
        return text
    parts, placed = [], False
    for p in content:
        if p.get("type") != "text":
            parts.append(p)
        elif not placed:
            parts.append({**p, "text": text})
            placed = True
    return parts if placed else parts + [{"type": "text", "text": text}]


def apply_named(records: list[dict], spec: str | None) -> list[dict]:
    """`apply` with a set named as in a config (a built-in name or a file); None leaves the records as they are."""
    return records if spec is None else apply(records, load_instructions(spec))
