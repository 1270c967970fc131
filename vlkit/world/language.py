"""What a scene says: captions, questions with short answers, boxes, text to read, class labels.

All functions are pure: (scene, rng) -> text. Answers are short and canonical so that exact-match
accuracy is meaningful. Every box is in the image's own normalised coordinates (`Scene.box`).
"""

from __future__ import annotations

import itertools
import re

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


def detailed_phrase(o: Obj) -> str:
    """An object as the detailed caption says it: 'a small red circle at the top left'."""
    return f"a {o.size} {o.name} {where(o.region)}"


def caption(scene: Scene, style: str = "detailed", rng: np.random.Generator | None = None) -> str:
    """The scene in words, its objects in reading order, or with `rng` in an order drawn from it (so that where
    an object is cannot be read from where it is named)."""
    objs = scene.ordered() if rng is None else [scene.objects[int(i)] for i in rng.permutation(len(scene.objects))]
    if style == "detailed":
        body = join([detailed_phrase(o) for o in objs])
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


_BOX = re.compile(r"\[\s*([-\d.]+)\s*,\s*([-\d.]+)\s*,\s*([-\d.]+)\s*,\s*([-\d.]+)\s*\]")


def _floats(m: re.Match) -> tuple[float, float, float, float] | None:
    try:
        return tuple(float(v) for v in m.groups())  # type: ignore[return-value]
    except ValueError:
        return None


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """Read the first '[x1,y1,x2,y2]' in `text`; None when there is none."""
    m = _BOX.search(text)
    return _floats(m) if m else None


def labelled_boxes(text: str) -> list[tuple[str, tuple[float, float, float, float]]]:
    """Every readable '[x1,y1,x2,y2]' in `text`, in order, each with the text since the previous box (what a
    grounded caption says of it): "a red circle [..] and a blue square [..]" -> [("a red circle ", box),
    (" and a blue square ", box)]."""
    out, start = [], 0
    for m in _BOX.finditer(text):
        box = _floats(m)
        if box is not None:
            out.append((text[start:m.start()], box))
            start = m.end()
    return out


def parse_boxes(text: str) -> list[tuple[float, float, float, float]]:
    """Every readable box in `text`, in order ("none" and text without boxes give [])."""
    return [box for _, box in labelled_boxes(text)]


def decided_relations(a_: Obj, b_: Obj) -> list[tuple[str, bool]]:
    """The spatial relations of `a_` to `b_` that the scene's regions decide (different columns for left/right,
    different rows for above/below), each with whether it holds."""
    col = lambda o: min(2, int(o.cx * 3))  # noqa: E731
    row = lambda o: min(2, int(o.cy * 3))  # noqa: E731
    options = []
    if col(a_) != col(b_):
        options += [("left of", col(a_) < col(b_)), ("right of", col(a_) > col(b_))]
    if row(a_) != row(b_):
        options += [("above", row(a_) < row(b_)), ("below", row(a_) > row(b_))]
    return options


def relation_question(scene: Scene, rng: np.random.Generator) -> tuple[str, str, str] | None:
    """A spatial relation between two objects, asked only where the scene's regions decide it
    (`decided_relations`), so the detailed caption answers it too."""
    objs = list(scene.objects)
    if len(objs) < 2:
        return None
    i, j = (int(v) for v in rng.choice(len(objs), size=2, replace=False))
    options = decided_relations(objs[i], objs[j])
    if not options:
        return None
    rel, truth = options[int(rng.integers(len(options)))]
    return relation_item(objs[i], rel, objs[j], truth)


def relation_item(a_: Obj, rel: str, b_: Obj, truth: bool) -> tuple[str, str, str]:
    return "relation", f"is the {a_.name} {rel} the {b_.name}?", "yes" if truth else "no"


def object_questions(objs: list[Obj]) -> list[tuple[str, str, str]]:
    """Per object: its colour by its shape, its shape by its colour (each where that word names one object only),
    and its position."""
    shapes, colors = [o.shape for o in objs], [o.color for o in objs]
    out = []
    for o in objs:
        if shapes.count(o.shape) == 1:
            out.append(("color", f"what color is the {o.shape}?", o.color))
        if colors.count(o.color) == 1:
            out.append(("shape", f"what shape is the {o.color} object?", o.shape))
        out.append(("position", f"where is the {o.name}?", o.region))
    return out


VQA_KINDS = ("color", "count", "exist", "position", "relation", "shape")  # the kinds vqa_pool asks (relation: opt-in)


def vqa_pool(scene: Scene, rng: np.random.Generator, relations: bool = False) -> list[tuple[str, str, str]]:
    """Every question this scene can answer: (kind, question, answer); `relations` adds a spatial relation
    between two objects (kind "relation")."""
    objs = list(scene.objects)
    out = object_questions(objs)
    shapes = [o.shape for o in objs]
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


def every_question(scene: Scene, relations: bool = False) -> list[tuple[str, str, str]]:
    """Every question of the kinds `vqa_pool` asks that this scene answers, enumerated, without randomness: what
    vqa_pool draws from for any rng, and more (a count for every shape, existence for every colour and shape,
    a relation for every ordered pair). A question whose answer depends on which of two same-named objects is
    meant is left out."""
    objs = list(scene.objects)
    shapes, names = [o.shape for o in objs], [o.name for o in objs]
    out = object_questions(objs)
    out.append(("count", "how many objects are there?", NUMBERS[len(objs)]))
    out += [("count", f"how many {plural(s)} are there?", NUMBERS[shapes.count(s)]) for s in SHAPES]
    out += [("exist", f"is there {a(c)} {c} {s}?", "yes" if f"{c} {s}" in names else "no")
            for c in COLORS for s in SHAPES]
    if relations:
        out += [relation_item(p, rel, q, truth)
                for p, q in itertools.permutations(objs, 2) for rel, truth in decided_relations(p, q)]
    answers: dict[str, set[str]] = {}
    for _, q, ans in out:
        answers.setdefault(q, set()).add(ans)
    return [item for item in dict.fromkeys(out) if len(answers[item[1]]) == 1]


_NAMED = {**{c: "C" for c in COLORS}, **{s: "S" for s in SHAPES}, **{plural(s): "S" for s in SHAPES}}
_NAMED_WORD = re.compile(r"\b(" + "|".join(sorted(_NAMED, key=len, reverse=True)) + r")\b")


def question_template(question: str) -> str:
    """A question with its colour words as C and its shape words as S ('is there an orange star?' -> 'is there
    a C S?'), so that answers can be scored per form of question (`how many S are there?` apart from `how many
    objects are there?`)."""
    return re.sub(r"\ban C\b", "a C", _NAMED_WORD.sub(lambda m: _NAMED[m.group(1)], question))


def vqa(scene: Scene, rng: np.random.Generator, relations: bool = False) -> tuple[str, str, str]:
    """One question drawn uniformly over kinds, then over that kind's questions."""
    pool = vqa_pool(scene, rng, relations)
    kinds = sorted({k for k, _, _ in pool})
    kind = kinds[rng.integers(len(kinds))]
    options = [q for q in pool if q[0] == kind]
    return options[rng.integers(len(options))]


GROUNDING_REQUEST = "give the box of {expr}."  # grounding and refer: the expression picks one object


def grounding(scene: Scene, rng: np.random.Generator) -> tuple[Obj, str, str]:
    o = scene.objects[rng.integers(len(scene.objects))]
    return o, GROUNDING_REQUEST.format(expr=f"the {o.name}"), box_text(scene.box(o))


# What a referring expression may say of its object, in order of preference.
ATTRIBUTES = ("shape", "color", "size", "region")


def describe(obj: Obj, attrs: tuple[str, ...]) -> str:
    """The phrase naming `attrs` of `obj`: ("shape", "size", "region") -> "the large circle on the left"."""
    words = ["the"] + [getattr(obj, a) for a in ("size", "color") if a in attrs]
    words.append(obj.shape if "shape" in attrs else "object")
    if "region" in attrs:
        words.append(where(obj.region))
    return " ".join(words)


def referring_expression(scene: Scene, obj: Obj, rng: np.random.Generator | None = None) -> str:
    """A phrase that picks `obj` alone among the scene's objects with the fewest attributes among its shape,
    colour, size and region (RefCOCO-style): "the circle", "the red object", "the large object", "the object on
    the left", "the red circle" (a world scene's colour and shape always suffice). Among equally short phrases,
    the first by ATTRIBUTES order, or one drawn with `rng`."""
    for n in range(1, len(ATTRIBUTES) + 1):
        unique = [attrs for attrs in itertools.combinations(ATTRIBUTES, n)
                  if sum(all(getattr(p, a) == getattr(obj, a) for a in attrs) for p in scene.objects) == 1]
        if unique:
            return describe(obj, unique[0] if rng is None else unique[int(rng.integers(len(unique)))])
    raise ValueError(f"no expression picks the {obj.name} alone: the scene has two objects equal in every attribute")


def refer(scene: Scene, rng: np.random.Generator) -> tuple[Obj, str, str, str]:
    """(object, expression, request, box answer) for one object of the scene."""
    o = scene.objects[rng.integers(len(scene.objects))]
    expr = referring_expression(scene, o, rng)
    return o, expr, GROUNDING_REQUEST.format(expr=expr), box_text(scene.box(o))


def grounded_caption(scene: Scene) -> str:
    """Every object with its box, in reading order: "a small red circle [0.10,0.20,0.27,0.37] and a large ..."."""
    return join([f"{a(o.size)} {o.size} {o.name} {box_text(scene.box(o))}" for o in scene.ordered()]) + "."


def matches_kind(obj: Obj, kind: str) -> bool:
    """Whether `obj` is of a detection kind: a plural shape ("circles") or a colour's objects ("red objects")."""
    return kind == f"{obj.color} objects" if kind.endswith(" objects") else kind == plural(obj.shape)


def detect(scene: Scene, rng: np.random.Generator, absent_prob: float = 0.2) -> tuple[str, list[tuple], str, str]:
    """(kind, boxes in reading order, request, answer): every object of a shape or a colour, the kind absent from
    the scene with `absent_prob` (answer "none")."""
    if rng.random() < absent_prob:
        kinds = [plural(s) for s in SHAPES if all(o.shape != s for o in scene.objects)]
        kinds += [f"{c} objects" for c in COLORS if all(o.color != c for o in scene.objects)]
        kind = kinds[rng.integers(len(kinds))]  # never empty: 6 objects cannot show all 7 shapes
    else:
        o = scene.objects[rng.integers(len(scene.objects))]
        kind = plural(o.shape) if rng.random() < 0.5 else f"{o.color} objects"
    boxes = [scene.box(o) for o in scene.ordered() if matches_kind(o, kind)]
    return kind, boxes, f"find all the {kind}.", "; ".join(box_text(b) for b in boxes) or "none"


def class_labels(scene: Scene) -> dict:
    return {"shapes": sorted({o.shape for o in scene.objects}),
            "colors": sorted({o.color for o in scene.objects}),
            "count": len(scene.objects)}


def class_answer(scene: Scene) -> str:
    return ", ".join(class_labels(scene)["shapes"])
