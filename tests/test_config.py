import subprocess
import sys

import pytest

from vlkit.config import apply_overrides, load
from vlkit.errors import VlkitError
from vlkit.recipes import load_config
from vlkit.recipes.lm import LMRecipe


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_yaml_and_overrides_are_typed(tmp_path):
    p = write(tmp_path, "recipe: lm\ntrain: {steps: 5, lr: 0.01}\n")
    cfg = load(LMRecipe, p, ["train.lr=2e-3", "model.family=opt", "data.world.train_scenes=9"])
    assert cfg.train.lr == 2e-3 and cfg.train.steps == 5 and cfg.model.family == "opt"
    assert cfg.data.world.train_scenes == 9


@pytest.mark.parametrize("text,override,message", [
    ("recipe: lm\ntrain: {stepz: 5}\n", [], "key 'train.stepz': unknown key"),
    ("recipe: lm\n", ["train.lrr=1"], "key 'train.lrr': unknown key"),
    ("recipe: lm\ntrain: {steps: many}\n", [], "key 'train.steps': Input should be a valid integer"),
    ("recipe: lm\nmodel: {family: gpt9}\n", [], "key 'model.family'"),
    ("recipe: lm\ntrain: {steps: [1\n", [], "malformed YAML"),
    ("- a\n- b\n", [], "expected a mapping"),
    ("train: {steps: 3}\n", [], "key 'recipe' is missing"),
    ("recipe: cook\n", [], "unknown recipe 'cook'"),
    ("recipe: lm\n", ["train.steps"], "not of the form key=value"),
    ("recipe: lm\ntrain: {steps: 3}\n", ["train.steps.x=1"], "'train.steps' is not a section"),
])
def test_config_errors_name_key_and_file(tmp_path, text, override, message):
    p = write(tmp_path, text)
    with pytest.raises(VlkitError) as e:
        load_config(p, override)
    assert message in str(e.value) and str(p) in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(VlkitError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_override_helper_does_not_mutate():
    data = {"a": {"b": 1}}
    assert apply_overrides(data, ["a.b=2", "c=x"]) == {"a": {"b": 2}, "c": "x"} and data == {"a": {"b": 1}}


def test_cli_prints_one_line_and_exits_2(tmp_path):
    p = write(tmp_path, "recipe: lm\ntrain: {stepz: 5}\n")
    res = subprocess.run([sys.executable, "-m", "vlkit.cli", "train", str(p)], capture_output=True, text=True)
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {p}: key 'train.stepz': unknown key; check the spelling against the recipe's config"]
