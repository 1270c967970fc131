"""The shapes world's SPHINX tasks (refer, grounded, detect, smalltext), non-square and scaled scenes, their
metrics, and the promise that every dataset made before them keeps its cache key and its bytes."""

import hashlib
import json
import re

import numpy as np
import pytest
from PIL import Image, ImageFont

from vlkit.data.records import load_records, validate_record
from vlkit.eval import metrics as M
from vlkit.eval.world import EvalConfig, score_items, select, summarize_items
from vlkit.world import WorldConfig, WorldData, build, generate_scene, render
from vlkit.world.dataset import DEFAULT_TASKS, SMALLTEXT_SIZE, TASKS, dataset_dir
from vlkit.data.instructions import slots
from vlkit.world.language import box_text, detect, grounded_caption, parse_box, refer, referring_expression, where
from vlkit.world.scene import BACKGROUND, COLORS, REGIONS, SHAPES, SIZES, Obj, Scene, Text, overlaps

NEW_TASKS = ["refer", "grounded", "detect", "smalltext"]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


# --- what existed before the SPHINX tasks stays as it was (values recorded from the code before them) ---------

def test_default_cache_keys_are_the_old_ones():
    assert dataset_dir(WorldData()).name == "339b4c88bb82"
    assert dataset_dir(WorldData(relations=True)).name == "61b08719c476"
    assert dataset_dir(WorldData(world=WorldConfig(resolution=128), train_scenes=10)).name == "8097637c8895"
    assert WorldData().tasks == ["caption", "vqa", "grounding", "text", "class", "edit"] == list(DEFAULT_TASKS)
    assert set(NEW_TASKS) <= set(TASKS)
    # Each new setting away from its default is a new dataset.
    keys = {dataset_dir(WorldData(**kw)).name for kw in
            ({}, {"smalltext_size": 0.03}, {"world": {"text_size": 0.05}}, {"world": {"aspects": [1.0, 2.0]}},
             {"world": {"size_scale": 0.5}}, {"tasks": list(DEFAULT_TASKS) + ["refer"]})}
    assert len(keys) == 6


def test_scenes_and_pixels_are_the_old_ones():
    scene_sha = {0: "fd92f1f431055915", 7: "8f4f64e99f097163", 123: "906be9b8d2c1ef8c", 2024: "a7cb29ccb7756982"}
    for seed, want in scene_sha.items():
        assert sha(json.dumps(generate_scene(seed).to_dict(), sort_keys=True).encode()) == want
    assert generate_scene(7).to_dict() == {
        "objects": [{"shape": "hexagon", "color": "orange", "size": "small", "cx": 0.2774, "cy": 0.3381},
                    {"shape": "cross", "color": "blue", "size": "large", "cx": 0.7184, "cy": 0.702},
                    {"shape": "cross", "color": "red", "size": "large", "cx": 0.8325, "cy": 0.3064},
                    {"shape": "star", "color": "cyan", "size": "small", "cx": 0.1306, "cy": 0.1239},
                    {"shape": "square", "color": "green", "size": "small", "cx": 0.2508, "cy": 0.6555}],
        "text": None, "seed": 7}
    # 0: text on the background; 65: text on an object; 7, 123: every shape but the circle and triangle.
    pixel_sha = {0: "7839ebc1d8327b46", 7: "bdfeb6f42de570ce", 123: "f4d4a149ea631e28", 65: "158902486303d281"}
    for seed, want in pixel_sha.items():
        assert sha(render(generate_scene(seed), 64).tobytes()) == want
    assert sha(render(generate_scene(65), 448).tobytes()) == "5128b189580508a6"


@pytest.fixture(scope="module")
def old_world():
    return build(WorldData(seed=3, train_scenes=12, test_scenes=4, relations=True), progress=False)


def test_a_dataset_of_the_old_tasks_has_the_old_bytes(old_world):
    records, pixels = hashlib.sha256(), hashlib.sha256()
    for p in sorted(old_world.rglob("*")):
        if p.is_file() and p.name != "info.json" and p.suffix != ".png":
            records.update(p.name.encode())
            records.update(p.read_bytes())
    for p in sorted((old_world / "img").glob("*.png")):
        pixels.update(p.name.encode())
        pixels.update(np.asarray(Image.open(p)).tobytes())
    assert records.hexdigest()[:16] == "7e69c2cca634d295"
    assert pixels.hexdigest()[:16] == "9c05a95279a2a3e3"


def test_slots_of_old_records_come_from_their_text(old_world):
    recs = load_records(old_world / "train.jsonl")
    vqa = next(r for r in recs if r["task"] == "vqa")
    assert slots(vqa) == {"question": vqa["messages"][0]["content"][1]["text"]}
    g = next(r for r in recs if r["task"] == "grounding")
    name = g["messages"][0]["content"][1]["text"].removeprefix("give the box of the ").removesuffix(".")
    assert name in {o["color"] + " " + o["shape"] for o in g["meta"]["scene"]["objects"]}
    assert slots(g) == {"question": f"give the box of the {name}."}
    assert slots(next(r for r in recs if r["task"] == "caption")).keys() == {"question"}


# --- referring expressions ---------------------------------------------------------------------------------------

PHRASES = {where(r): r for row in REGIONS for r in row}
EXPR = re.compile(rf"the (?:({'|'.join(SIZES)}) )?(?:({'|'.join(COLORS)}) )?({'|'.join(SHAPES)}|object)"
                  rf"(?: ({'|'.join(PHRASES)}))?")


def picked(scene: Scene, expr: str) -> list[Obj]:
    """The objects an expression describes, read from its words alone."""
    m = EXPR.fullmatch(expr)
    assert m, expr
    size, color, noun, phrase = m.groups()
    return [o for o in scene.objects if (size is None or o.size == size) and (color is None or o.color == color)
            and (noun == "object" or o.shape == noun) and (phrase is None or o.region == PHRASES[phrase])]


def test_referring_expressions_pick_exactly_their_object():
    rng = np.random.default_rng(0)
    forms = set()
    for seed in range(300):
        s = generate_scene(seed)
        for o in s.objects:
            for expr in (referring_expression(s, o), referring_expression(s, o, rng)):
                assert picked(s, expr) == [o], (seed, expr)
                m = EXPR.fullmatch(expr)
                forms.add(tuple(g is not None and g != "object" for g in m.groups()))
            if [p.shape for p in s.objects].count(o.shape) == 1:
                assert referring_expression(s, o) == f"the {o.shape}"  # the fewest attributes, shape first
        obj, expr, request, answer = refer(s, rng)
        assert picked(s, expr) == [obj] and request == f"give the box of {expr}."
        assert answer == box_text(s.box(obj))
    # shape alone, colour alone, size alone, region alone, colour and shape: every form occurs.
    assert {(False, False, True, False), (False, True, False, False), (True, False, False, False),
            (False, False, False, True), (False, True, True, False)} <= forms


# --- non-square and scaled scenes --------------------------------------------------------------------------------

def ink_box(img: Image.Image, threshold: int = 60) -> tuple[int, int, int, int]:
    """Pixel bounding box (x1, y1, x2, y2), exclusive ends, of everything that is not the background."""
    a = np.abs(np.asarray(img).astype(int) - np.array(BACKGROUND)).max(axis=2)
    ys, xs = np.nonzero(a > threshold)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


@pytest.mark.parametrize("aspect,size_scale", [(2.0, 1.0), (0.5, 1.0), (2.0, 0.5), (1.0, 1.0)])
@pytest.mark.parametrize("shape", ["square", "circle", "diamond", "triangle", "cross"])
def test_emitted_box_matches_the_rendered_pixels(aspect, size_scale, shape):
    s = Scene((Obj(shape, "red", "large", 0.3, 0.6),), aspect=aspect, size_scale=size_scale)
    img = render(s, 256)
    w, h = img.size
    assert (w, h) == ((256, 128) if aspect == 2.0 else (128, 256) if aspect == 0.5 else (256, 256))
    box = s.box(s.objects[0])
    assert all(0 <= v <= 1 for v in box)
    px = np.array(box) * [w, h, w, h]
    assert np.abs(np.array(ink_box(img)) - px).max() <= 1.5
    x1, y1, x2, y2 = ink_box(img)
    assert abs((x2 - x1) - (y2 - y1)) <= 1  # undistorted: as wide as tall
    assert (x2 - x1) == pytest.approx(SIZES["large"] * size_scale * min(w, h), abs=2)  # of the shorter side
    assert parse_box(box_text(box)) == pytest.approx(box, abs=0.006)


def test_nonsquare_scenes_keep_their_objects_apart_and_inside():
    cfg = WorldConfig(aspects=[0.5, 1.0, 2.0, 3.0], size_scale=0.7)
    aspects = set()
    for seed in range(300):
        s = generate_scene(seed, cfg)
        aspects.add(s.aspect)
        # the same objects and text as the square world: the aspect is drawn after them
        square = generate_scene(seed)
        assert (s.objects, s.text) == (square.objects, square.text)
        boxes = [s.box(o) for o in s.objects]
        for i, (o, b) in enumerate(zip(s.objects, boxes)):
            assert all(0.0 <= v <= 1.0 for v in b)
            lb = o.box  # inside its layout box, which generation keeps apart from the others
            assert lb[0] <= b[0] and lb[1] <= b[1] and b[2] <= lb[2] and b[3] <= lb[3]
            assert not overlaps(b, boxes[:i] + boxes[i + 1:], margin=0.0)
        assert Scene.from_dict(s.to_dict()) == s
    assert aspects == {0.5, 1.0, 2.0, 3.0}
    assert "aspect" not in generate_scene(3).to_dict() and generate_scene(3, cfg).to_dict()["size_scale"] == 0.7


def test_edits_keep_the_aspect():
    from vlkit.world.edits import EDIT_KINDS, edit_scene

    s = generate_scene(11, WorldConfig(aspects=[2.0], size_scale=0.8, min_objects=3))
    for kind in EDIT_KINDS:
        new, _, _ = edit_scene(s, np.random.default_rng(0), kind)
        assert (new.aspect, new.size_scale) == (2.0, 0.8)


# --- small text --------------------------------------------------------------------------------------------------

def glyph_height(res: int, text_size: float, value: str = "88") -> int:
    g = np.asarray(render(Scene((), Text(value, None, 0.5, 0.5)), res, text_size).convert("L"), float)
    ys, _ = np.nonzero(np.abs(g - g[0, 0]) > 40)
    return int(ys.max() - ys.min() + 1) if len(ys) else 0


def test_text_size_sets_the_glyph_height():
    _, top, _, bottom = ImageFont.load_default(size=1000).getbbox("88")
    digit = (bottom - top) / 1000  # the font's digit height per unit of font size (~0.72)
    for size, res in ((0.075, 448), (0.04, 448), (0.025, 448), (0.04, 192), (0.1, 256)):
        assert glyph_height(res, size) == pytest.approx(digit * size * res, abs=1.5), (size, res)
    # the smalltext default: two rows at 64 px (unreadable), five or more from 192 px (readable)
    assert glyph_height(64, SMALLTEXT_SIZE) <= 2 and glyph_height(192, SMALLTEXT_SIZE) >= 5
    # non-square: the font follows the shorter side
    tall = render(Scene((), Text("88", None, 0.5, 0.5), aspect=0.5), 448, 0.04)
    assert abs(ink_box(tall, 40)[3] - ink_box(tall, 40)[1] - glyph_height(224, 0.04)) <= 1


# --- datasets of the new tasks -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sphinx_world():
    cfg = WorldData(seed=2, train_scenes=24, test_scenes=6, tasks=NEW_TASKS,
                    world={"resolution": 96, "text_prob": 0.8, "aspects": [1.0, 2.0, 0.5], "size_scale": 0.8})
    root = build(cfg, progress=False)
    return cfg, root, load_records(root / "train.jsonl") + load_records(root / "test.jsonl")


def test_new_task_records_validate_and_say_their_boxes(sphinx_world):
    _, _, recs = sphinx_world
    assert {r["task"] for r in recs} == set(NEW_TASKS)
    for r in recs:
        validate_record(r)
        s = Scene.from_dict(r["meta"]["scene"])
        answer = r["messages"][-1]["content"][0]["text"]
        assert slots(r) == r["meta"]["slots"] and slots(r)["question"] == r["messages"][0]["content"][1]["text"]
        size = Image.open(r["images"][0]).size
        assert size == s.image_size(96)
        if r["task"] == "refer":
            [obj] = picked(s, r["meta"]["expr"])
            assert r["meta"]["box"] == list(s.box(obj)) and answer == box_text(s.box(obj))
            assert r["meta"]["slots"]["expr"] == r["meta"]["expr"]
        elif r["task"] == "grounded":
            objs = s.ordered()
            assert r["meta"]["names"] == [o.name for o in objs] and r["meta"]["boxes"] == [list(s.box(o)) for o in objs]
            assert answer == grounded_caption(s) and answer.count("[") == len(objs)
        elif r["task"] == "detect":
            kind = r["meta"]["slots"]["kind"]
            want = [list(s.box(o)) for o in objs_of(s, kind)]
            assert r["meta"]["boxes"] == want and (answer == "none") == (not want)
            assert answer == "; ".join(box_text(b) for b in want) or answer == "none"
        else:
            assert answer == s.text.value and r["meta"]["text_size"] == SMALLTEXT_SIZE
            assert r["images"][0].endswith("-small.png")
    assert sum(r["task"] == "smalltext" for r in recs) == sum(Scene.from_dict(r["meta"]["scene"]).text is not None
                                                              for r in recs if r["task"] == "refer")


def objs_of(s: Scene, kind: str) -> list[Obj]:
    if kind.endswith(" objects"):
        return [o for o in s.ordered() if o.color == kind.removesuffix(" objects")]
    return [o for o in s.ordered() if kind in (o.shape + "s", o.shape + "es")]


def test_detect_asks_for_absent_kinds_a_fifth_of_the_time():
    rng = np.random.default_rng(1)
    answers = [detect(generate_scene(seed), rng)[3] for seed in range(500)]
    assert 0.15 < sum(a == "none" for a in answers) / 500 < 0.25


def test_references_score_perfectly_and_blanks_score_zero(sphinx_world):
    _, _, recs = sphinx_world
    by_task = select(recs, EvalConfig(tasks=NEW_TASKS, max_per_task=1000))
    assert set(by_task) == set(NEW_TASKS)
    for task, rs in by_task.items():
        refs = [r["messages"][-1]["content"][0]["text"] for r in rs]
        perfect = summarize_items(task, rs, score_items(task, rs, refs))
        if task == "refer":  # the answer's two decimals move a box by up to 0.005
            assert 0.9 < perfect.pop("refer_miou") < 1.0
        assert all(v == 1.0 for v in perfect.values()), task
        blank = summarize_items(task, rs, score_items(task, rs, [""] * len(rs)))
        if task == "detect":  # an empty answer is "none": right exactly where nothing is to be found
            assert blank["detect_f1"] == np.mean([not r["meta"]["boxes"] for r in rs])
        else:
            assert all(v == 0.0 for v in blank.values()), task
    assert set(summarize_items("refer", by_task["refer"], score_items("refer", by_task["refer"], ["x"]))) == {
        "refer_iou50", "refer_miou"}


# --- metrics on hand-made predictions ----------------------------------------------------------------------------

A, B, C = (0.1, 0.1, 0.3, 0.3), (0.5, 0.5, 0.8, 0.8), (0.6, 0.1, 0.9, 0.4)


def test_detect_f1():
    assert M.detect_f1(f"{box_text(A)}; {box_text(B)}", [A, B]) == 1.0
    assert M.detect_f1(f"{box_text(B)}; {box_text(A)}", [A, B]) == 1.0  # order does not matter
    assert M.detect_f1(f"{box_text(A)}; {box_text(C)}", [A, B]) == 0.5  # one of two right: 2 * 1 / 4
    assert M.detect_f1(f"{box_text(A)}; {box_text(A)}", [A]) == pytest.approx(2 / 3)  # one to one
    assert M.detect_f1(box_text(A), [A, B, C]) == 0.5  # 2 * 1 / 4
    assert M.detect_f1("[0.1,0.1,0.22,0.22]", [A]) == 0.0  # IoU 0.36: below 0.5
    assert M.detect_f1("none", []) == 1.0 and M.detect_f1("", []) == 1.0
    assert M.detect_f1("none", [A]) == 0.0 and M.detect_f1(box_text(A), []) == 0.0


def test_box_matching_is_greedy_one_to_one():
    near_a = (0.1, 0.1, 0.3, 0.32)  # IoU 0.91 with A
    assert M.match_boxes([near_a, A], [A]) == [(1, 0)]  # the better pair first, then near_a has nothing left
    assert M.match_boxes([A, B], [B, A]) == [(0, 1), (1, 0)]
    assert M.match_boxes([A], [C]) == []
    assert M.match_boxes([A, B], [A, B], allowed=lambda i, j: i == 1) == [(1, 1)]


def test_grounded_scores():
    names, boxes = ["red circle", "blue square"], [A, B]
    perfect = f"a small red circle {box_text(A)} and a large blue square {box_text(B)}."
    assert M.grounded_scores(perfect, names, boxes) == (1.0, 1.0)
    # the names swapped: every box is where an object is, but labelled with the other's name
    swapped = f"a small blue square {box_text(A)} and a large red circle {box_text(B)}."
    assert M.grounded_scores(swapped, names, boxes) == (0.0, 0.0)
    # one right, one extra box: recall 1/2, precision 1/2
    extra = f"a red circle {box_text(A)} and a green star {box_text(C)}."
    assert M.grounded_scores(extra, names, boxes) == (0.5, 0.5)
    # one right and nothing else: recall 1/2, precision 1
    assert M.grounded_scores(f"a red circle {box_text(A)}.", names, boxes) == (0.5, 1.0)
    assert M.grounded_scores("a red circle and a blue square.", names, boxes) == (0.0, 0.0)
    # a name must appear as whole words: "red circles" is not "red circle", "dark red circle" contains it
    assert M.grounded_scores(f"the red circles {box_text(A)}", names, boxes) == (0.0, 0.0)
    assert M.grounded_scores(f"a dark red circle {box_text(A)}", names, boxes) == (0.5, 1.0)
