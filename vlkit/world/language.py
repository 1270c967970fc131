"""What a scene says: captions, questions with short answers, boxes, text to read, class labels.

All functions are pure: (scene, rng) -> text. Answers are short and canonical so that exact-match
accuracy is meaningful.
"""

from __future__ import annotations

import numpy as np

from vlkit.world.scene import COLORS, SHAPES, Obj, Scene, plural

NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def where(region: str) -> str:
    """'top left' -> 'at the top left', 'left' -> 'on the left', 'center' -> 'in the center'."""
    if region == "center":
        return "in the center"
    if region in ("left", "right"):
        return f"on the {region}"
    return f"at the {region}"


def a(word: str) -> str:
    """The indefinite article for `word`."""
    return "an" if word[0] in "aeiou" else "a"


def join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def text_sentence(scene: Scene) -> str:
    t = scene.text
    if t is None:
        return ""
    kind = "number" if t.value.isdigit() else "word"
    place = f"on the {scene.objects[t.on].name}" if t.on is not None else "in the background"
    return f' the {kind} "{t.value}" is written {place}.'


CAPTION_STYLES = ("detailed", "list", "count", "positions")


def caption(scene: Scene, style: str = "detailed") -> str:
    objs = scene.ordered()
    if style == "detailed":
        body = join([f"a {o.size} {o.name} {where(o.region)}" for o in objs])
    elif style == "list":
        body = join([f"{a(o.name)} {o.name}" for o in objs])
    elif style == "count":
        n = len(objs)
        noun = "object" if n == 1 else "objects"
        body = f"{NUMBERS[n]} {noun}: " + join([f"a {o.size} {o.name}" for o in objs])
    elif style == "positions":
        body = join([f"{a(o.name)} {o.name} {where(o.region)}" for o in objs])
    else:
        raise ValueError(f"unknown caption style {style!r}; choose from {CAPTION_STYLES}")
    return body + "." + text_sentence(scene)


def all_captions(scene: Scene) -> list[str]:
    return [caption(scene, s) for s in CAPTION_STYLES]


def box_text(box: tuple[float, float, float, float]) -> str:
    return "[" + ",".join(f"{min(1.0, max(0.0, v)):.2f}" for v in box) + "]"


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """Read the first '[x1,y1,x2,y2]' in `text`; None when there is none."""
    import re

    m = re.search(r"\[\s*([-\d.]+)\s*,\s*([-\d.]+)\s*,\s*([-\d.]+)\s*,\s*([-\d.]+)\s*\]", text)
    if not m:
        return None
    try:
        return tuple(float(v) for v in m.groups())  # type: ignore[return-value]
    except ValueError:
        return None


def relation_question(scene: Scene, rng: np.random.Generator) -> tuple[str, str, str] | None:
    """A spatial relation between two objects, asked only where the scene's regions decide it (different
    columns for left/right, different rows for above/below), so the detailed caption answers it too."""
    objs = list(scene.objects)
    if len(objs) < 2:
        return None
    i, j = (int(v) for v in rng.choice(len(objs), size=2, replace=False))
    a_, b_ = objs[i], objs[j]
    col = lambda o: min(2, int(o.cx * 3))  # noqa: E731
    row = lambda o: min(2, int(o.cy * 3))  # noqa: E731
    options = []
    if col(a_) != col(b_):
        options += [("left of", col(a_) < col(b_)), ("right of", col(a_) > col(b_))]
    if row(a_) != row(b_):
        options += [("above", row(a_) < row(b_)), ("below", row(a_) > row(b_))]
    if not options:
        return None
    rel, truth = options[int(rng.integers(len(options)))]
    return "relation", f"is the {a_.name} {rel} the {b_.name}?", "yes" if truth else "no"


def vqa_pool(scene: Scene, rng: np.random.Generator, relations: bool = False) -> list[tuple[str, str, str]]:
    """Every question this scene can answer: (kind, question, answer); `relations` adds a spatial relation
    between two objects (kind "relation")."""
    objs = list(scene.objects)
    out: list[tuple[str, str, str]] = []
    shapes = [o.shape for o in objs]
    colors = [o.color for o in objs]
    for o in objs:
        if shapes.count(o.shape) == 1:
            out.append(("color", f"what color is the {o.shape}?", o.color))
        if colors.count(o.color) == 1:
            out.append(("shape", f"what shape is the {o.color} object?", o.shape))
        out.append(("position", f"where is the {o.name}?", o.region))
    out.append(("count", "how many objects are there?", NUMBERS[len(objs)]))
    shape = SHAPES[rng.integers(len(SHAPES))] if rng.random() < 0.5 else shapes[rng.integers(len(shapes))]
    out.append(("count", f"how many {plural(shape)} are there?", NUMBERS[shapes.count(shape)]))
    # Existence, balanced between present and absent objects.
    if rng.random() < 0.5:
        o = objs[rng.integers(len(objs))]
        out.append(("exist", f"is there {a(o.name)} {o.name}?", "yes"))
    else:
        names = {o.name for o in objs}
        for _ in range(20):
            c, s = list(COLORS)[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))]
            if f"{c} {s}" not in names:
                out.append(("exist", f"is there {a(c)} {c} {s}?", "no"))
                break
    if relations:
        q = relation_question(scene, rng)
        if q is not None:
            out.append(q)
    return out


def vqa(scene: Scene, rng: np.random.Generator, relations: bool = False) -> tuple[str, str, str]:
    """One question drawn uniformly over kinds, then over that kind's questions."""
    pool = vqa_pool(scene, rng, relations)
    kinds = sorted({k for k, _, _ in pool})
    kind = kinds[rng.integers(len(kinds))]
    options = [q for q in pool if q[0] == kind]
    return options[rng.integers(len(options))]


def grounding(scene: Scene, rng: np.random.Generator) -> tuple[Obj, str, str]:
    o = scene.objects[rng.integers(len(scene.objects))]
    return o, f"give the box of the {o.name}.", box_text(o.box)


def class_labels(scene: Scene) -> dict:
    return {"shapes": sorted({o.shape for o in scene.objects}),
            "colors": sorted({o.color for o in scene.objects}),
            "count": len(scene.objects)}


def class_answer(scene: Scene) -> str:
    return ", ".join(class_labels(scene)["shapes"])
