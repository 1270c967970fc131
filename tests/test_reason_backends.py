"""Backends against real models: the local backend, and the OpenAI-compatible backend against a real `vlkit serve`
on 127.0.0.1; the `ats` recipe end to end; the `vlkit ats` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from test_trainer import free_port
from vlkit.errors import VlkitError
from vlkit.reason.backends import LocalBackend, OpenAIBackend, make_backend
from vlkit.reason.games import get_game
from vlkit.reason.methods import build_messages
from vlkit.reason.runner import run, summarise


@pytest.fixture(scope="module")
def server(tiny_lm):
    """`vlkit serve` in its own process, serving the tiny LM."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vlkit", "serve", str(tiny_lm), "--port", str(port),
                             "--name", "tiny"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"vlkit serve exited: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("vlkit serve did not come up in 60 s")
    yield url + "/v1"
    proc.terminate()
    proc.wait(timeout=10)


def test_openai_backend_against_vlkit_serve_matches_the_local_model(server, tiny_lm):
    game = get_game("numpath")
    insts = game.instances("test", 3)
    remote = OpenAIBackend(base_url=server, api_key="unused", concurrency=1)  # one at a time: no padding
    assert remote.name == "tiny"  # discovered from GET /v1/models
    local = LocalBackend(tiny_lm, batch_size=1)
    convs = [build_messages(game, i, "cot") for i in insts]
    got, want = remote.complete(convs, max_tokens=12), local.complete(convs, max_tokens=12)
    for g, w in zip(got, want):
        assert g.error is None
        # the server counts tokens with the same tokenizer and template, and greedy text is the same text
        assert (g.prompt_tokens, g.completion_tokens, g.text) == (w.prompt_tokens, w.completion_tokens, w.text)
        assert g.completion_tokens > 0


def test_runner_through_the_server_records_usage(server):
    game = get_game("arithmetic")
    rows = run(game, game.instances("test", 2), "cot", OpenAIBackend(base_url=server), max_tokens=8)
    assert [r["error"] for r in rows] == [None, None]
    assert all(r["prompt_tokens"] > 50 and 0 < r["completion_tokens"] <= 8 for r in rows)  # system prompt counted
    assert all(r["correct"] is False and r["reason"] for r in rows)  # an untrained world LM solves nothing
    # the ATS-BFS system prompt does not fit this tiny model's 512-token context: each row says so, none crashes
    rows = run(game, game.instances("test", 2), "ats-bfs", OpenAIBackend(base_url=server), max_tokens=8)
    assert all(r["error"].startswith("HTTP 400") and "context" in r["error"] for r in rows)
    assert summarise(rows)[0]["errors"] == 2 and summarise(rows)[0]["tokens_per_answer"] is None


def test_openai_backend_reports_per_request_errors_and_dead_servers(server):
    backend = OpenAIBackend(base_url=server)
    huge = [{"role": "user", "content": "1 2 3 " * 2000}]
    (c,) = backend.complete([huge], max_tokens=4)
    assert c.error and c.error.startswith("HTTP 400") and c.text == ""
    with pytest.raises(VlkitError, match="cannot list models"):
        OpenAIBackend(base_url=f"http://127.0.0.1:{free_port()}/v1")


def test_backend_configuration_errors(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(VlkitError, match="OPENAI_BASE_URL is not set"):
        make_backend("openai", None)
    with pytest.raises(VlkitError, match="needs --model"):
        make_backend("local", None)
    with pytest.raises(VlkitError, match="model directory not found"):
        make_backend("local", str(tmp_path / "nope"))
    with pytest.raises(VlkitError, match="unknown backend"):
        make_backend("vllm", "x")


@pytest.fixture(scope="module")
def ats_model(tmp_path_factory):
    from vlkit.config import load
    from vlkit.recipes.ats import ATSRecipe, run as run_recipe

    out = tmp_path_factory.mktemp("ats")
    cfg = load(ATSRecipe, None, [f"output_dir={out}", "data.games=[numpath,arithmetic]", "data.train_per_game=40",
                                 "data.format=ats-dfs", "model.hidden_size=32", "model.num_layers=2",
                                 "model.num_heads=2", "model.intermediate_size=64", "train.steps=6",
                                 "train.batch_size=8", "train.warmup_steps=2", "train.progress=false",
                                 "eval.test_per_game={numpath: 3, arithmetic: 2}", "eval.max_new_tokens=24",
                                 "eval.batch_size=3"])
    return out, run_recipe(cfg)


def test_ats_recipe_trains_saves_and_evaluates(ats_model):
    out, results = ats_model
    assert results["train_examples"] + results["dropped_too_long"] == 80
    assert json.loads((out / "model" / "reason.json").read_text())["method"] == "ats-dfs"
    assert [e["game"] for e in results["eval"]] == ["numpath", "arithmetic"]
    assert [e["n"] for e in results["eval"]] == [3, 2]  # held-out instances per game, as asked
    assert all(0 < e["tokens_per_answer"] <= 24 for e in results["eval"])
    backend = LocalBackend(out / "model")
    assert backend.style == "tuned" and backend.trained_method == "ats-dfs"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 6


def test_ats_training_masks_the_question():
    from vlkit.data.tokenizer import train_bpe
    from vlkit.recipes.ats import ATSData, TraceDataset, trace_examples

    data = ATSData(games=["game24"], train_per_game=3, format="cot")
    examples = trace_examples(data, ["cot"])["cot"]
    tok = train_bpe([m["content"] for ex in examples for m in ex["messages"]], 300, split_digits=True)
    ds = TraceDataset(examples, tok, 512)
    ids, labels = ds[0]
    supervised = tok.decode([t for t, lab in zip(ids, labels) if lab != -100])
    assert supervised.strip().startswith("Step 1:") and "Answer:" in supervised
    assert "Use the numbers" not in supervised
    assert len(TraceDataset(examples, tok, 20)) == 0  # everything too long is left out, and counted
    assert TraceDataset(examples, tok, 20).dropped == 3


def test_cli_ats_writes_rows_and_summary(ats_model, tmp_path):
    out, _ = ats_model
    target = tmp_path / "rows.jsonl"
    r = subprocess.run([sys.executable, "-m", "vlkit", "ats", "--game", "numpath", "--method", "ats-dfs",
                        "--backend", "local", "--model", str(out / "model"), "--n", "2", "--max-tokens", "16",
                        "--out", str(target)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in target.read_text().splitlines()]
    assert [x["id"] for x in rows] == ["numpath-test-0000", "numpath-test-0001"]
    assert {"answer", "correct", "reason", "prompt_tokens", "completion_tokens", "tree"} <= set(rows[0])
    summary = json.loads(target.with_suffix(".summary.json").read_text())
    assert summary[0]["n"] == 2 and "| numpath | ats-dfs | 2 |" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "vlkit", "ats", "--game", "chess", "--backend", "local", "--model",
                          str(out / "model")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown game 'chess'" in bad.stderr


def test_the_ats_report_pairs_formats_over_seeds_on_the_same_instances(tmp_path):
    from vlkit.experiments import ats as exp
    from vlkit.experiments import provenance
    from vlkit.fileio import write_json

    games = {"numpath": 40, "grass": 40}

    def fake(name, solved):  # solved(game, i, seed) -> bool
        fmt, _, seed = name.partition("_s")
        rows = [{"game": g, "id": i, "correct": solved(g, i, int(seed or 0))}
                for g, n in games.items() for i in range(n)]
        (tmp_path / name).mkdir()
        write_json(tmp_path / name / "eval_rows.json", rows)
        ev = [{"game": g, "n": n, "solved": sum(r["correct"] for r in rows if r["game"] == g),
               "accuracy": sum(r["correct"] for r in rows if r["game"] == g) / n, "tokens_per_answer": 10.0,
               "goal_marked": None, "tree_nodes": None} for g, n in games.items()]
        return {"eval": ev, "params": 1000, "train_examples": 80, "dropped_too_long": 0, "train_tokens": 5000,
                "steps": 6, "train_seconds": 1.0}
    runs = {}
    for seed in range(2):
        runs[exp.seeded("cot", seed)] = fake(exp.seeded("cot", seed), lambda g, i, s: i % 4 == 0)
        runs[exp.seeded("ats-bfs", seed)] = fake(exp.seeded("ats-bfs", seed), lambda g, i, s: i % 4 != 3)
        runs[exp.seeded("ats-dfs", seed)] = fake(exp.seeded("ats-dfs", seed), lambda g, i, s: (i + s) % 4 == 0)
    s = exp.summarize(runs, tmp_path, seeds=2)
    assert s["n"] == 80 and s["formats"]["cot"]["over_seeds"]["mean"] == 25.0
    assert s["vs_cot"]["ats-bfs"]["diff"] == 50.0 and s["vs_cot"]["ats-bfs"]["seeds"] == 2
    assert [c["verdict"] for c in s["claims"]] == ["holds", "not shown (within noise)"]
    s["seconds"], s["provenance"] = {"total": 1.0}, provenance()
    md = exp.report(s, exp.plot(s, tmp_path))
    assert "| ATS-BFS-tuned beats CoT-tuned" in md and "ATS-DFS-tuned (seed 1)" in md
