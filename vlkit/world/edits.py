"""Edits of a scene and the sentence that describes the difference (for multi-image tasks)."""

from __future__ import annotations

import re

import numpy as np

from vlkit.world.language import a, where
from vlkit.world.scene import COLORS, SHAPES, Scene, overlaps, replace, sample_object

# The world's `edit` task draws from these; "swap" is made on request only (adding it here would change the world).
EDIT_KINDS = ("recolor", "reshape", "move", "delete", "add")


def edit_scene(scene: Scene, rng: np.random.Generator, kind: str | None = None, index: int | None = None,
               kinds: tuple[str, ...] = EDIT_KINDS) -> tuple[Scene, str, str]:
    """Apply one edit; returns (edited scene, edit kind, description). `kind` forces the edit, else one of
    `kinds` is drawn; `index` names the object to edit (else one is drawn; 'add' adds a new one). Falls back
    to another kind, finally 'recolor', when the edit is impossible (e.g. deleting the only object)."""
    objs = list(scene.objects)
    names = {o.name for o in objs}
    kinds = [kind] if kind else list(kinds)
    rng.shuffle(kinds)
    for k in kinds + ["recolor"]:
        i = int(rng.integers(len(objs))) if index is None else index
        o = objs[i]
        if k == "recolor":
            choices = [c for c in COLORS if c != o.color and f"{c} {o.shape}" not in names]
            if not choices:
                continue
            c = choices[rng.integers(len(choices))]
            objs[i] = replace(o, color=c)
            return _with(scene, objs, i), k, f"the {o.name} turned {c}."
        if k == "reshape":
            choices = [s for s in SHAPES if s != o.shape and f"{o.color} {s}" not in names]
            if not choices:
                continue
            s = choices[rng.integers(len(choices))]
            objs[i] = replace(o, shape=s)
            return _with(scene, objs, i), k, f"the {o.name} became {a(o.color)} {o.color} {s}."
        if k == "move":
            others = [p.box for j, p in enumerate(objs) if j != i]
            for _ in range(30):
                new = sample_object(rng, others, o.shape, o.color, o.size, tries=1)
                if new is not None and new.region != o.region:
                    objs[i] = new
                    moved = f"the {o.name} moved from {_bare(o.region)} to {_bare(new.region)}."
                    return _with(scene, objs, i), k, moved
            continue
        if k == "swap":
            for j in rng.permutation(len(objs)):
                p = objs[j]
                if j == i or p.region == o.region:
                    continue
                a_, b_ = replace(o, cx=p.cx, cy=p.cy), replace(p, cx=o.cx, cy=o.cy)
                rest = [q.box for n, q in enumerate(objs) if n not in (i, j)]
                inside = all(0 <= v <= 1 for v in a_.box + b_.box)
                if inside and not overlaps(a_.box, rest + [b_.box]) and not overlaps(b_.box, rest):
                    objs[i], objs[j] = a_, b_
                    return _with(_with(scene, objs, i), objs, j), k, f"the {o.name} and the {p.name} swapped places."
            continue
        if k == "delete":
            if len(objs) < 2:
                continue
            del objs[i]
            text = scene.text
            if text is not None and text.on is not None:
                text = None if text.on == i else replace(text, on=text.on - (text.on > i))
            return replace(scene, objects=tuple(objs), text=text), k, f"the {o.name} disappeared."
        if k == "add":
            if len(objs) >= 6:
                continue
            for _ in range(20):
                new = sample_object(rng, [p.box for p in objs])
                if new is not None and new.name not in names:
                    objs.append(new)
                    appeared = f"{a(new.name)} {new.name} appeared {where(new.region)}."
                    return replace(scene, objects=tuple(objs)), k, appeared
    raise RuntimeError("no edit applies to this scene")  # unreachable: recolor always has a free colour


_SENTENCE = re.compile(r"^(?:the|an?) (\w+ \w+)(?: and the (\w+ \w+))? "
                       r"(turned|became|moved|swapped|disappeared|appeared)\b(.*?)\.?$")
CHANGES = {"turned": "recolor", "became": "reshape", "moved": "move", "swapped": "swap", "disappeared": "delete",
           "appeared": "add"}


def read_edit(sentence: str) -> tuple[frozenset[str], str, str] | None:
    """What an edit sentence of `edit_scene` says: (the objects it names, the edit kind, the rest of the change:
    the new colour, shape or place, with articles dropped); None for a sentence not in that form.
    "the red circle turned blue." -> ({"red circle"}, "recolor", "blue")."""
    m = _SENTENCE.match(" ".join(sentence.lower().split()))
    if not m:
        return None
    names = frozenset(n for n in m.group(1, 2) if n)
    rest = " ".join(w for w in re.sub(r"[^\w ]", " ", m.group(4)).split() if w not in ("a", "an", "the"))
    return names, CHANGES[m.group(3)], rest


def _bare(region: str) -> str:
    return f"the {region}"


def _with(scene: Scene, objs: list, i: int) -> Scene:
    text = scene.text
    if text is not None and text.on == i:
        o = objs[i]
        text = replace(text, cx=o.cx, cy=o.cy)
    return replace(scene, objects=tuple(objs), text=text)  # keeps the aspect and size scale
