"""Smoke runs of the benchmarks at tiny sizes (their figures mean nothing here; what is checked is that each runs
end to end and reports every figure). vlm_vs_llava's and gpu_step's are in test_speed / test_gpu_step, import_rss's
in test_importers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from test_vlm import make

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_serve_load_streams_against_a_served_model_with_and_without_batching(tiny_tokenizer, tmp_path):
    from vlkit.models.io import save_vlm

    model, proc = make(tiny_tokenizer)
    save_vlm(model, tmp_path / "model", proc)
    out = script("serve_load").main(["--model", str(tmp_path / "model"), "--clients", "3", "--duration", "1.5",
                                     "--max-tokens", "4", "--stream", "--world", "30,12",
                                     "--json", str(tmp_path / "load.json")])
    for mode in ("batching", "one_at_a_time"):
        r = out[mode]
        assert r["requests"] > 0 and r["errors"] == 0 and r["engine_failures"] == 0
        assert r["mean_completion_tokens"] == 4 and r["p99_latency_s"] >= r["p50_latency_s"] > 0  # ignore_eos
        assert r["p50_first_token_s"] > 0 and r["mean_batch"] >= 1 and r["mean_step_s"] > 0
    assert out["one_at_a_time"]["mean_batch"] == 1 and out["tokens_per_s_ratio"] > 0
    assert out["command"].startswith("python benchmarks/serve_load.py --model")
    assert (tmp_path / "load.json").exists()


def test_data_pipeline_reports_memory_and_throughput(tmp_path):
    rows = script("data_pipeline").main(["--sizes", "40", "--images", "4", "--batches", "2", "--batch-size", "4",
                                         "--workers", "1", "--no-eager", "--root", str(tmp_path)])
    assert [(r["mode"], r["workers"]) for r in rows] == [("lazy", 0), ("lazy", 1)]
    assert all(r["records"] == 40 and r["peak_rss_mib"] > 0 and r["samples_per_s"] > 0 for r in rows)


def test_world_text_reader_benchmark_reads_a_few_scenes(capsys):
    script("world_text_reader").main(["--text-scenes", "6", "--blank-scenes", "3"])
    out = capsys.readouterr().out
    assert "text_prob 1: exact match" in out and "text_prob 0: exact match" in out


EXPERIMENTS = BENCHMARKS.parent / "experiments"


def test_binding_probe_finds_the_named_object_and_reports_a_curve(tmp_path):
    spec = importlib.util.spec_from_file_location("binding_probe", EXPERIMENTS / "binding_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    from vlkit.world.scene import Scene

    # the named object of each colour / shape / position question is the one whose value is the answer
    records = probe.heldout_questions(probe.scenes(900_000, 60, (2, 6)))
    checked = 0
    for r in records:
        scene = Scene.from_dict(r["meta"]["scene"])
        i = probe.named_object(r, scene)
        kind = r["meta"]["kind"]
        if kind not in ("color", "shape", "position"):
            assert i is None
            continue
        o = scene.ordered()[i]
        assert r["meta"]["answer"] == {"color": o.color, "shape": o.shape, "position": o.region}[kind]
        text = r["messages"][0]["content"][0]["text"]
        spans = probe.object_spans(text, scene)
        assert len(spans) == len(scene.objects) and o.name in text[slice(*spans[i])]
        checked += 1
    assert checked > 20

    small = ["--objects", "2,3", "--scenes", "20", "--eval-questions", "16", "--block", "160"]
    out = probe.main([*small, "--steps", "4", "--eval-every", "2", "--layers", "2", "--hidden", "32", "--heads", "2",
                      "--mlp", "64", "--vocab", "300", "--listing", "--save", str(tmp_path / "m"),
                      "--json", str(tmp_path / "probe.json")])
    assert [p["step"] for p in out["curve"]] == [2, 4] and 0 <= out["final"]["acc"] <= 1
    att = out["attention"]
    assert att["n"] > 0 and 0 < att["uniform_share"] < 1 and len(att["layers"]) == 2
    assert all(0 <= la["named_share"] <= 1 and 0 <= la["head"] < 2 for la in att["layers"])
    # softmax weights are positive: a share above 0 says the question's word for the object was found
    assert all(0 < la["question_word"] <= 1 for la in att["layers"])
    assert (tmp_path / "probe.json").exists() and out["command"].startswith("python experiments/binding_probe.py")
    # the warm-up runs its three stages, each to --recall-warmup steps or until it reaches --warmup-until
    warmed = probe.main(["--objects", "2,3", "--scenes", "300", "--eval-questions", "8", "--block", "160", "--steps",
                       "2", "--eval-every", "2", "--layers", "1", "--hidden", "32", "--heads", "2", "--mlp", "64",
                       "--recall-warmup", "3", "--warmup-until", "1.0", "--recall-keep", "0.5",
                       "--json", str(tmp_path / "warm.json")])
    # --recall-keep 0.5: as many lookup rows as drill blocks; the lookup is scored again after the drills
    assert warmed["train_rows"] == 2 * warmed["drill_rows"] and out["train_rows"] == out["drill_rows"]
    assert 0 <= warmed["recall_after"] <= 1
    assert out["recall_after"] is None
    warm = warmed["recall_warmup"]
    assert [w["steps"] for w in warm] == [3, 3, 3] and all(0 <= w["heldout_acc"] < 1 for w in warm)
    assert [w["stage"] for w in warm] == ["copy", "mix:0", "mix:1"]
    # the listing lookup is scored on every bound word: one colour per object its shape names alone, and so on
    test_scenes = probe.scenes(900_000, 16, (2, 3))
    for kind, other in (("color", "shape"), ("shape", "color")):
        named_alone = sum([getattr(p, other) for p in s.objects].count(getattr(o, other)) == 1
                          for s in test_scenes for o in s.objects)
        assert out["listing"][kind]["n"] == named_alone > 0 and 0 <= out["listing"][kind]["acc"] <= 1
    # a curriculum: the saved model goes on, with its own tokenizer and sizes
    more = probe.main([*small, "--steps", "2", "--eval-every", "2", "--init", str(tmp_path / "m"),
                       "--json", str(tmp_path / "probe2.json")])
    assert more["params"] == out["params"] and len(more["attention"]["layers"]) == 2
    for bad in (["--kinds", "colour"], ["--init", str(tmp_path / "m"), "--qk-init", "4"], ["--init-std", "0"],
                ["--init", str(tmp_path / "m"), "--init-std", "0.1"]):
        with pytest.raises(SystemExit):  # refused before any scene is made
            probe.main([*small, *bad])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert probe.reinit(model, 0.5) == 2 * 7 + 2  # q k v o gate up down per layer, the embedding and the head
    assert 0.45 < float(model.model.embed_tokens.weight.std()) < 0.55 and model.config.initializer_range == 0.5
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert probe.scale_qk(model, 3.0) == 2 * 2  # q and k of each of the 2 layers
    for k, v in model.state_dict().items():
        assert torch.allclose(v, before[k] * (3.0 if k.endswith(("q_proj.weight", "k_proj.weight")) else 1.0))


def test_recall_probe_scores_the_shortcut_and_trains_each_task(tmp_path):
    from vlkit.world.recall import SPECIALS, lookup_batch

    spec = importlib.util.spec_from_file_location("recall_probe", EXPERIMENTS / "recall_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    keys, values, s = 8, 5, SPECIALS
    # the shortcut is scored: a model that always answers one value of the row has all its errors in the row
    ids, labels, in_seq = lookup_batch(torch.Generator().manual_seed(4), 30, keys, values, (3, 3), 2, "vk", 1)

    class FirstValue(torch.nn.Module):  # answers every query with the row's first value (order vk)
        def forward(self, input_ids):
            logits = torch.zeros(*input_ids.shape, s + keys + values)
            logits[torch.arange(input_ids.shape[0]), :, input_ids[:, 1]] = 1.0
            return type("Out", (), {"logits": logits})()

    got = probe.evaluate(FirstValue(), ids, labels, in_seq, keys)
    assert got["n"] == 60 and 0 < got["acc"] < 1 and got["wrong_in_sequence"] == 1.0
    out = probe.main(["--steps", "4", "--eval-every", "2", "--eval-rows", "20", "--hidden", "16", "--heads", "2",
                      "--mlp", "32", "--save", str(tmp_path / "m"), "--json", str(tmp_path / "r.json")])
    assert [p["step"] for p in out["curve"]] == [2, 4] and out["final"]["n"] == 60 and 0 <= out["final"]["acc"] <= 1
    more = probe.main(["--steps", "2", "--eval-every", "2", "--eval-rows", "20", "--init", str(tmp_path / "m"),
                       "--json", str(tmp_path / "r2.json")])
    assert more["parameters"] == out["parameters"] and (tmp_path / "r2.json").exists()
    # --until stops at the first evaluation that reaches it; the copy task trains and scores its own rows
    copy = probe.main(["--task", "repeat", "--steps", "6", "--eval-every", "2", "--eval-rows", "10", "--until", "0",
                       "--init", str(tmp_path / "m"), "--json", str(tmp_path / "r3.json")])
    assert [p["step"] for p in copy["curve"]] == [2] and copy["final"]["n"] > 10
    for bad in (["--pairs", "2"], ["--pairs", "3,9"], ["--length", "1,4"], ["--length", "5"],
                ["--init", str(tmp_path), "--steps", "1"],
                ["--init", str(tmp_path / "m"), "--keys", "9"], ["--gap", "-1"]):
        with pytest.raises(SystemExit):
            probe.main([*bad, "--json", str(tmp_path / "bad.json")])
    assert not (tmp_path / "bad.json").exists()
