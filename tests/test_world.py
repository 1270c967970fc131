import hashlib

import numpy as np
import pytest

from vlkit.world import WorldConfig, WorldData, build, generate_scene, render
from vlkit.world.dataset import scene_seed
from vlkit.world.edits import EDIT_KINDS, edit_scene
from vlkit.world.language import caption, parse_box, vqa_pool
from vlkit.world.scene import COLORS, SHAPES, Scene, overlaps


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_vocabulary_sizes():
    assert len(SHAPES) >= 6 and len(COLORS) >= 8


def test_same_seed_same_scene_and_pixels():
    a, b = generate_scene(123), generate_scene(123)
    assert a == b
    assert render(a, 64).tobytes() == render(b, 64).tobytes()
    assert generate_scene(124) != a


def test_scene_invariants_over_many_seeds():
    cfg = WorldConfig()
    counts = set()
    for seed in range(300):
        s = generate_scene(seed, cfg)
        counts.add(len(s.objects))
        boxes = [o.box for o in s.objects]
        for i, b in enumerate(boxes):
            assert all(0.0 <= v <= 1.0 for v in b)
            assert not overlaps(b, boxes[:i] + boxes[i + 1:], margin=0.0)
        assert len({o.name for o in s.objects}) == len(s.objects)  # every object nameable
        assert Scene.from_dict(s.to_dict()) == s
    assert counts == set(range(1, 7))


def test_region_names_follow_the_3x3_grid():
    from vlkit.world.scene import Obj

    assert Obj("circle", "red", "small", 0.1, 0.1).region == "top left"
    assert Obj("circle", "red", "small", 0.5, 0.5).region == "center"
    assert Obj("circle", "red", "small", 0.9, 0.5).region == "right"
    assert Obj("circle", "red", "small", 0.5, 0.95).region == "bottom"


def test_render_any_resolution_and_object_colour_at_its_centre():
    s = generate_scene(5)
    for res in (32, 64, 448):
        img = render(s, res)
        assert img.size == (res, res) and img.mode == "RGB"
    img = np.asarray(render(s, 256))
    for o in s.objects:
        if o.shape in ("circle", "square", "hexagon", "diamond") and (s.text is None or s.text.on is None):
            px = img[int(o.cy * 256), int(o.cx * 256)]
            assert np.abs(px.astype(int) - np.array(COLORS[o.color])).max() < 40


def test_vqa_answers_are_true_of_the_scene():
    rng = np.random.default_rng(0)
    for seed in range(100):
        s = generate_scene(seed)
        for kind, q, a in vqa_pool(s, rng):
            if kind == "color":
                shape = q.split("the ")[1].rstrip("?")
                assert [o.color for o in s.objects if o.shape == shape] == [a]
            elif kind == "exist":
                name = q.split("is there ")[1].split(" ", 1)[1].rstrip("?")
                assert (a == "yes") == any(o.name == name for o in s.objects)
            elif kind == "position":
                name = q.split("where is the ")[1].rstrip("?")
                assert [o.region for o in s.objects if o.name == name] == [a]


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_edits_change_exactly_what_they_describe(kind):
    for seed in range(40):
        s = generate_scene(seed, WorldConfig(min_objects=2, max_objects=5))
        new, done, text = edit_scene(s, np.random.default_rng(seed), kind)
        before, after = {o.name for o in s.objects}, {o.name for o in new.objects}
        if done == "delete":
            assert len(new.objects) == len(s.objects) - 1 and "disappeared" in text
            assert text.split("the ")[1].split(" disappeared")[0] in before - after
        elif done == "add":
            assert len(new.objects) == len(s.objects) + 1 and "appeared" in text
        elif done == "recolor":
            old = text.split("the ")[1].split(" turned")[0]
            assert old in before and old not in after and text.endswith(".")
        elif done == "move":
            assert before == after and [o.region for o in s.ordered()] != [o.region for o in new.ordered()] or \
                sorted(o.region for o in s.objects) != sorted(o.region for o in new.objects)
        elif done == "reshape":
            assert len(before - after) == 1


def test_grounding_box_text_round_trip():
    s = generate_scene(3)
    o = s.objects[0]
    from vlkit.world.language import box_text

    assert parse_box(box_text(o.box)) == pytest.approx(o.box, abs=0.006)
    assert parse_box("no box here") is None


def test_captions_mention_every_object():
    s = generate_scene(11)
    for style in ("detailed", "list", "count", "positions"):
        text = caption(s, style)
        assert all(o.name in text for o in s.objects)


def test_dataset_bytes_are_deterministic_and_cached(tmp_path, monkeypatch):
    cfg = WorldData(seed=3, train_scenes=12, test_scenes=4)
    monkeypatch.setenv("VLKIT_CACHE", str(tmp_path / "a"))
    a = build(cfg, progress=False)
    monkeypatch.setenv("VLKIT_CACHE", str(tmp_path / "b"))
    b = build(cfg, progress=False)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != "info.json")
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name != "info.json")
    assert files_a == files_b and len(files_a) > 20
    assert all(digest(a / f) == digest(b / f) for f in files_a)
    mtime = (b / "train.jsonl").stat().st_mtime_ns
    assert build(cfg, progress=False) == b and (b / "train.jsonl").stat().st_mtime_ns == mtime  # cache hit


def test_splits_use_disjoint_seeds(tiny_world):
    cfg, root = tiny_world
    train = {scene_seed(cfg.seed, "train", i) for i in range(cfg.train_scenes)}
    test = {scene_seed(cfg.seed, "test", i) for i in range(cfg.test_scenes)}
    assert not train & test


def test_records_have_every_task_and_valid_images(tiny_world):
    from vlkit.data.records import load_records

    _, root = tiny_world
    recs = load_records(root / "train.jsonl")
    assert {r["task"] for r in recs} == {"caption", "vqa", "grounding", "text", "class", "edit"}
    edit = next(r for r in recs if r["task"] == "edit")
    assert len(edit["images"]) == 2


def test_preview_writes_a_png(tmp_path, tiny_world):
    from PIL import Image

    from vlkit.data.records import load_records
    from vlkit.world.preview import preview_records

    _, root = tiny_world
    path = preview_records(load_records(root / "test.jsonl")[:5], tmp_path / "sheet.png", title="t")
    img = Image.open(path)
    assert img.width > 300 and img.height > 5 * 128
