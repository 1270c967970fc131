"""DEMON-format harness (fixtures in the public layout), DEMON's scoring rules, and mini-DEMON."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vlkit.errors import VlkitError
from vlkit.eval import demon as D
from vlkit.eval.metrics import rouge_l

FIXTURES = Path(__file__).parent / "fixtures" / "demon"


def test_fixtures_load_with_categories_and_instructions():
    tasks = {t.name: t for t in D.load_demon(FIXTURES)}
    assert set(tasks) == {"shapes_diff", "shapes_pick"}
    assert tasks["shapes_diff"].category == "Visual Relation Inference"
    assert tasks["shapes_pick"].category == "Multi-Image Reasoning"
    assert not tasks["shapes_diff"].multiple_choice and tasks["shapes_pick"].multiple_choice
    assert len(tasks["shapes_diff"].instructions) == 2
    assert [t.name for t in D.load_demon(FIXTURES, tasks=["shapes_pick"])] == ["shapes_pick"]


def test_prompt_follows_instruction_markers_and_choices():
    diff, pick = D.load_demon(FIXTURES)
    conv, images = D.to_conversation(diff, diff.instances[2])  # markers in the order {image#2} ... {image#1}
    parts = conv[0]["content"]
    assert [p["type"] for p in parts] == ["text", "image", "text", "image", "text"]
    assert parts[0]["text"] == "Describe the difference between the two images."
    assert [p.name for p in images] == ["2.png", "1.png"]
    conv, images = D.to_conversation(pick, pick.instances[2])  # a {table#k} marker is an image too
    text = " ".join(p["text"] for p in conv[0]["content"] if p["type"] == "text")
    assert [p["type"] for p in conv[0]["content"]][:2] == ["text", "image"] and len(images) == 1
    assert text.endswith("Choice list: ['there is a red circle.', 'there is no circle.', 'everything is blue.']. "
                         "Your answer is:")


def test_free_text_maps_to_the_nearest_option_by_tfidf():
    options = ["a red circle", "a blue square", "two green stars"]
    assert D.nearest_option("I think it is the blue square", options) == 1
    assert D.nearest_option("stars, two of them", options) == 2
    assert D.nearest_option("", options) == 0  # nothing to match: the first option, scored like any other
    inst = {"response": "two green stars", "task_instance": {"choice_list": options}}
    assert D.score_instance("green stars", inst, multiple_choice=True) == 1.0
    assert D.score_instance("a red one", inst, multiple_choice=True) == 0.0


def test_image_options_are_judged_by_the_leading_image_x():
    inst = {"response": "Image 2", "task_instance": {"choice_list": ["Image 1", "Image 2", "Image 3"]}}
    assert D.score_instance("Image 2", inst, True) == 1.0
    assert D.score_instance("image #2, because it has a circle", inst, True) == 1.0
    assert D.score_instance("Image 3. Not image 2", inst, True) == 0.0
    assert D.score_instance("the second image (image 2)", inst, True) == 0.0  # must lead with it
    assert D.image_option("Image A: the left one") == "a"


def test_open_ended_answers_score_rouge_l_and_categories_average_their_tasks():
    inst = {"response": "the red circle turned blue."}
    assert D.score_instance("the red circle became blue", inst, False) == pytest.approx(
        rouge_l(["the red circle became blue"], [["the red circle turned blue."]]))
    tasks = D.load_demon(FIXTURES)
    s = D.summarise({"shapes_diff": [0.5, 1.0], "shapes_pick": [0.0, 1.0, 1.0]}, tasks)
    assert s["tasks"] == {"shapes_diff": 75.0, "shapes_pick": pytest.approx(200 / 3)}
    assert s["categories"]["Visual Relation Inference"] == 75.0
    assert s["average"] == pytest.approx((75.0 + 200 / 3) / 2)


def test_harness_scores_perfect_answers_100_and_wrong_ones_0(monkeypatch, tiny_tokenizer):
    """The whole pipeline (loading, prompts, images through the model's tower, scoring) with the generator replaced
    by one that answers each prompt with its reference, then with nonsense."""
    from test_vlm import make

    model, proc = make(tiny_tokenizer)
    tasks = D.load_demon(FIXTURES)
    refs = {}
    for t in tasks:
        for inst in t.instances:
            refs[json.dumps(D.to_conversation(t, inst)[0])] = inst["response"]
    seen_features = []

    def oracle(model, processor, convs, imgs, gen, image_inputs=None):
        pixels = image_inputs["pixel_values"]  # use_features=False: pixels, as the model's transform makes them
        assert pixels.shape[1:] == (3, processor.transforms[0].size, processor.transforms[0].size)
        seen_features.append(model.image_features(**image_inputs).shape[0])
        assert seen_features[-1] == sum(len(i) for i in imgs)
        return [{"text": refs[json.dumps(c)]} for c in convs]

    monkeypatch.setattr(D, "generate", oracle)
    res = D.evaluate_demon(model, proc, tasks, use_features=False)
    assert res["tasks"] == {"shapes_diff": 100.0, "shapes_pick": 100.0} and res["average"] == 100.0
    assert sum(seen_features) == 2 + 2 + 2 + 2 + 1 + 1
    monkeypatch.setattr(D, "generate", lambda m, p, convs, *a, **k: [{"text": "zzz"} for _ in convs])
    res = D.evaluate_demon(model, proc, tasks, use_features=False)
    assert res["tasks"]["shapes_diff"] == 0.0 and res["tasks"]["shapes_pick"] < 100.0


def test_harness_runs_a_real_tiny_vlm(tiny_tokenizer):
    from test_vlm import make

    model, proc = make(tiny_tokenizer)
    res = D.evaluate_demon(model, proc, D.load_demon(FIXTURES), max_new_tokens=4, use_features=False)
    assert res["counts"] == {"shapes_diff": 3, "shapes_pick": 3}
    assert all(0 <= v <= 100 for v in res["tasks"].values())
    preds = res["predictions"]
    assert all(isinstance(p["prediction"], str) and 0 <= p["score"] <= 1 for v in preds.values() for p in v)
    assert res["tasks"]["shapes_diff"] == pytest.approx(100 * np.mean([p["score"] for p in preds["shapes_diff"]]))


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["data"][0].pop("response"), "data[0]: key 'response' is missing"),
    (lambda d: d["data"][1].update(task_instruction_id=7), "task_instruction_id 7 is out of range"),
    (lambda d: d["data"][0]["task_instance"].update(context="{image#3}"), "{image#3} but only 2 images_path"),
    (lambda d: d.pop("metadata"), "expected an object with 'metadata' and 'data'"),
])
def test_malformed_benchmarks_name_the_file_and_record(tmp_path, edit, message):
    root = tmp_path / "bench"
    shutil.copytree(FIXTURES, root)
    path = root / "shapes_diff" / "core" / "core.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(VlkitError, match=message.replace("{", r"\{").replace("[", r"\[").replace("]", r"\]")) as e:
        D.load_demon(root)
    assert str(path) in str(e.value)


def test_no_benchmark_found_is_a_clear_error(tmp_path):
    with pytest.raises(VlkitError, match="no <task>/core/core.json found"):
        D.load_demon(tmp_path)
    with pytest.raises(VlkitError, match="not a directory"):
        D.load_demon(tmp_path / "missing")


def test_mini_demon_has_seven_categories_five_templates_and_valid_instances():
    from vlkit.world.demon import CATEGORIES, MiniDemonConfig, build_mini_demon

    root = build_mini_demon(MiniDemonConfig(instances=200), progress=False)
    tasks = D.load_demon(root)  # loads through the harness, so every instance passed its checks
    assert {t.category for t in tasks} == set(CATEGORIES) and len(CATEGORIES) == 7
    for t in tasks:
        assert len(t.instances) == 200 and len(set(t.instructions)) >= 5
        assert {i["task_instruction_id"] for i in t.instances} == set(range(len(t.instructions)))
        for inst in t.instances:
            ti = inst["task_instance"]
            assert all((t.image_dir / p).is_file() for p in ti["images_path"])
            if "choice_list" in ti:  # the answer is one of the options, and the options differ
                assert inst["response"] in ti["choice_list"] and len(set(ti["choice_list"])) == len(ti["choice_list"])
    by_name = {t.name: t for t in tasks}
    assert all(D.image_option(i["response"]) for i in by_name["md_which_image"].instances)
    assert all(len(i["task_instance"]["images_path"]) == 6 for i in by_name["md_cloze"].instances)
    assert build_mini_demon(MiniDemonConfig(instances=200)) == root  # cached


def test_mini_demon_answers_are_true_of_the_scenes():
    """Regenerate instances alongside their scenes and check the answers against the scenes themselves."""
    import numpy as np

    from vlkit.world import demon as MD

    class Capture(MD._Writer):
        def __init__(self):
            self.data, self.scenes = [], []

        def image(self, scene, name):
            self.scenes.append(scene)
            return name

    for maker, check in ((MD._which_image, "which"), (MD._both, "both"), (MD._knowledge, "knowledge")):
        w, rng = Capture(), np.random.default_rng(0)
        for i in range(30):
            start = len(w.scenes)
            maker(w, rng, 5, i)
            inst, scenes = w.data[-1], w.scenes[start:]
            if check == "which":
                target = inst["task_instance"]["context"].split("which image has ")[1].rstrip("?")
                target = target.split(" ", 1)[1]
                has = [any(o.name == target for o in s.objects) for s in scenes]
                assert has.count(True) == 1 and inst["response"] == f"Image {has.index(True) + 1}"
            elif check == "both":
                shape = inst["response"].removeprefix("both images contain a ").rstrip(".")
                assert all(any(o.shape == shape for o in s.objects) for s in scenes)
                for c in inst["task_instance"]["choice_list"]:
                    if c != inst["response"]:
                        other = c.removeprefix("both images contain a ").rstrip(".")
                        assert not all(any(o.shape == other for o in s.objects) for s in scenes)
            else:
                ctx = inst["task_instance"]["context"]
                color = ctx.split("how many points is the ")[1].split(" object")[0]
                (obj,) = [o for o in scenes[0].objects if o.color == color]
                from vlkit.world.scene import plural

                assert f"{plural(obj.shape)} are worth {inst['response']} point" in ctx


def test_cli_eval_demon_on_the_fixtures(tmp_path, tiny_tokenizer):
    from test_vlm import make

    from vlkit.models.io import save_vlm

    model, proc = make(tiny_tokenizer)
    save_vlm(model, tmp_path / "vlm", proc)
    out = subprocess.run([sys.executable, "-m", "vlkit", "eval", str(tmp_path / "vlm"), "demon", "--root",
                          str(FIXTURES), "--out", str(tmp_path / "pred.json")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert set(res["categories"]) == {"Visual Relation Inference", "Multi-Image Reasoning"}
    assert len(json.loads((tmp_path / "pred.json").read_text())["shapes_pick"]) == 3
    bad = subprocess.run([sys.executable, "-m", "vlkit", "eval", str(tmp_path / "vlm"), "demon", "--root",
                          str(tmp_path / "nowhere")], capture_output=True, text=True)
    assert bad.returncode != 0 and "not a directory" in bad.stderr and "Traceback" not in bad.stderr
