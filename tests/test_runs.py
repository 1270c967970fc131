"""Runs never corrupt what exists: a failing run leaves the run it lands on as it was, a finished run resumes to
its results, a kill while checkpoints are written or pruned leaves nothing half-done, and bad input of every kind
is a one-line error (exit code 2), never a traceback."""

import json
import subprocess
import sys

import pytest
import torch

from test_cli import tiny_lm_config
from test_trainer import collate, data, loss_fn, tiny_model
from vlkit.errors import VlkitError
from vlkit.train import TrainConfig, Trainer


def vlkit(*args):
    """The `vlkit` command run in this process (as `python -m vlkit.cli` runs it, without the interpreter's start-up):
    its exit code, stdout and stderr."""
    import contextlib
    import io
    from types import SimpleNamespace

    from vlkit.cli import main

    out, err, argv = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = ["vlkit", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def one_line(res):
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    return res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-1500:]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_world):
    conf, out = tiny_lm_config(tmp_path_factory.mktemp("runs"), tiny_world[0])
    res = vlkit("train", conf)
    assert res.returncode == 0, res.stderr
    return conf, out, json.loads(res.stdout)


def test_a_failing_run_leaves_the_run_it_lands_on_as_it_was(finished, tmp_path):
    conf, out, _ = finished
    before = {n: (out / n).read_bytes() for n in ("config.yaml", "run.json", "metrics.jsonl")}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "r1", "messages": "oops"}\n')
    for args, says in [((f"data.train={bad}", "--overwrite"), "'messages' must be a non-empty list"),
                       (("train.device=garbage", "--overwrite"), "train.device: 'garbage' is not a device"),
                       (("train.steps=6", "--resume"), "different config"),
                       (("train.lr=0.5",), "pass --resume")]:
        res = vlkit("train", conf, *args)
        ok, err = one_line(res)
        assert ok and says in res.stderr, (args, err)
        assert {n: (out / n).read_bytes() for n in before} == before, args  # not one byte rewritten
    res = vlkit("train", conf, "train.steps=6", "--resume")  # the changed config is still refused afterwards
    assert res.returncode == 2 and "different config" in res.stderr


def test_resuming_a_finished_run_reports_it_complete(finished):
    conf, out, first = finished
    res = vlkit("train", conf, "--resume")
    assert res.returncode == 0, res.stderr[-2000:]
    again = json.loads(res.stdout)
    assert again["heldout_ppl"] == first["heldout_ppl"] and again["steps"] == 4


def test_a_resume_reads_past_a_line_cut_off_by_a_kill(tmp_path):
    cfg = TrainConfig(steps=6, batch_size=8, lr=1e-2, warmup_steps=1, save_every=3, log_every=1, progress=False)
    Trainer(tiny_model(0), cfg, data(), collate, loss_fn, tmp_path).fit()
    log = tmp_path / "metrics.jsonl"
    log.write_text(log.read_text() + '{"step": 7, "lo')  # the kill cut the last line in half
    cfg9 = cfg.model_copy(update={"steps": 9})
    Trainer(tiny_model(0), cfg9, data(), collate, loss_fn, tmp_path).fit(resume=True)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 10))


def test_kills_while_writing_or_pruning_leave_nothing_half_done(tmp_path):
    from vlkit.train.checkpoint import latest_checkpoint

    cfg = TrainConfig(steps=6, batch_size=8, lr=1e-2, warmup_steps=1, save_every=2, log_every=1, progress=False,
                      keep_checkpoints=1)
    Trainer(tiny_model(0), cfg, data(), collate, loss_fn, tmp_path).fit()
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000006"]
    # what kills leave behind: a checkpoint being written, one being pruned, one an old pruner half deleted
    (root / ".step-0000008.abc123.tmp").mkdir()
    (root / ".step-0000008.abc123.tmp" / "trainable.safetensors").write_bytes(b"x" * 1000)
    (root / ".step-0000002.deleting").mkdir()
    (root / "step-0000004").mkdir()
    (root / "step-0000004" / "state.json").write_text("{}")
    cfg8 = cfg.model_copy(update={"steps": 8})
    Trainer(tiny_model(0), cfg8, data(), collate, loss_fn, tmp_path).fit(resume=True)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000008"]
    assert latest_checkpoint(root).name == "step-0000008"


def test_a_checkpoint_of_another_model_size_is_a_clear_error(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = TrainConfig(steps=2, batch_size=8, lr=1e-2, warmup_steps=1, progress=False)
    Trainer(tiny_model(0), cfg, data(), collate, loss_fn, tmp_path).fit()
    wider = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
    with pytest.raises(VlkitError, match="checkpoint of another model size"):
        Trainer(wider, cfg.model_copy(update={"steps": 4}), data(), collate, loss_fn, tmp_path).fit(resume=True)


def test_bad_records_and_configs_are_one_line_errors(tmp_path, finished):
    conf, out, _ = finished
    img_missing = tmp_path / "missing.jsonl"
    img_missing.write_text(json.dumps({"id": "r7", "task": "caption", "images": ["nope.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe"}]},
        {"role": "assistant", "content": "a cat"}]}) + "\n")
    not_str = tmp_path / "ints.jsonl"
    not_str.write_text(json.dumps({"id": "r8", "images": [123], "messages": [
        {"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "x"}]}) + "\n")
    listed = tmp_path / "listed.yaml"
    listed.write_text("recipe: [lm]\n")
    vpg = ["configs/world/vpg_qformer.yaml", f"model.llm.path={out / 'model'}", "model.tower.arch={model_type: "
           "clip_vision_model, hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, num_attention_heads: 2, "
           "image_size: 16, patch_size: 8}", "model.tower.path=null", f"output_dir={tmp_path / 'v'}"]
    for args, says in [((*vpg, f"data.train={img_missing}", f"data.test={img_missing}"), "record r7: image"),
                       ((*vpg, f"data.train={not_str}", f"data.test={not_str}"), "'images' must be a list of image"),
                       ((listed,), "unknown recipe ['lm']")]:
        res = vlkit("train", *args)
        ok, err = one_line(res)
        assert ok and says in res.stderr, (args, err)


@pytest.mark.parametrize("config,says", [
    ([1, 2], "not a vlkit model"),
    ({"model_type": "vlkit_vlm", "vlm": {}}, "key 'image_token_id' is missing"),
    ({"model_type": "vlkit_vlm", "format": 2, "image_token_id": 2, "vlm": {"tower": {"kind": 5}}}, "(vlm): key"),
])
def test_broken_model_directories_are_one_line_errors(tmp_path, config, says):
    from test_vlm import make  # noqa: F401  (tests/ on sys.path)
    from vlkit.models.io import load_vlm

    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_tokens": 1, "transforms": []}))
    with pytest.raises(VlkitError, match=says.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_vlm(tmp_path)


def test_pickle_only_directories_are_refused_before_anything_is_unpickled(tmp_path):
    from transformers import LlamaConfig

    from vlkit.models.llm import load_llm

    LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(VlkitError, match="holds only pickle weights.*convert them to safetensors"):
        load_llm(tmp_path)
    res = subprocess.run([sys.executable, "-m", "vlkit.cli", "guard", str(tmp_path), "--prompt", "hi"],
                         capture_output=True, text=True)  # as a user runs it: exit code 2, one line
    ok, err = one_line(res)
    assert ok and "pickle weights" in res.stderr, err
