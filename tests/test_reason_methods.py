"""Methods, the ATS tree parser, gold traces, Tree of Thoughts, the runner and its accounting."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings, strategies as st

from vlkit.errors import VlkitError
from vlkit.reason.backends import Completion
from vlkit.reason.games import GAMES, extract_answer, get_game
from vlkit.reason.methods import SYSTEM, build_messages
from vlkit.reason.runner import run, summarise, table
from vlkit.reason.tot import tree_of_thoughts, value_of
from vlkit.reason.traces import FORMATS, gold_trace
from vlkit.reason.tree import parse_tree

BFS = """Level 1:
[1] 4+5=9 | left: 6 9 10
[2] 10-4=6 | left: 5 6 6
Level 2:
[1.1] 4+5=9 -> 9+6=15 | left: 10 15 (dead end)
[2.1] 10-4=6 -> 6*5=30 | left: 6 30
[2.2] 10-4=6 -> 6-5=1 | left: 1 6
[2.3] 10-4=6 -> 6+6=12 | left: 5 12
Level 3:
[2.1.1] 10-4=6 -> 6*5=30 -> 30-6=24 | left: 24 (goal)
Summary: [2.1.1] 10-4=6 -> 6*5=30 -> 30-6=24
Answer: (10-4)*5-6 = 24"""


def test_parse_tree_counts_a_bfs_answer():
    s = parse_tree(BFS).stats()
    # internal nodes: the root (2 children), [1] (1), [2] (3), [2.1] (1): mean 7/4
    assert s == {"nodes": 7, "depth": 3, "branching": 1.75, "max_branching": 3, "goal_marked": True,
                 "goal_id": "2.1.1", "dead_ends": 1, "backtracks": 0, "orphans": 0, "has_summary": True,
                 "skipped_lines": 0}
    tree = parse_tree(BFS)
    assert tree.children("2") == ["2.1", "2.2", "2.3"] and tree.children("2.1") == ["2.1.1"]


def noisy(text: str, rng: random.Random) -> str:
    """The same tree written sloppily: other brackets, bold, bullets, blank lines, other goal phrasing."""
    out = []
    for line in text.splitlines():
        if line.startswith("["):
            nid, body = line[1:].split("] ", 1)
            style = rng.choice(["[{}] {}", "**[{}]** {}", "- ({}) {}", "{}: {}", "Node {} - {}", "{}) {}"])
            body = body.replace("(goal)", rng.choice(["(goal)", "(Goal reached!)", "✓ goal reached"]))
            line = style.format(nid, body)
        out.append(line)
        if rng.random() < 0.3:
            out.append("")
    return "\n".join(out)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000))
def test_parse_tree_is_tolerant_of_formatting_noise(seed):
    clean = parse_tree(BFS).stats()
    got = parse_tree(noisy(BFS, random.Random(seed))).stats()
    for key in ("nodes", "depth", "branching", "max_branching", "goal_marked", "goal_id", "orphans"):
        assert got[key] == clean[key], key


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_parse_tree_never_raises(text):
    s = parse_tree(text).stats()
    assert s["nodes"] >= 0 and s["depth"] >= 0


def test_parse_tree_reads_dfs_step_backs():
    text = ("[1] 4x2=8 | at 8\n[1.1] 8x2=16 | at 16 (dead end)\nStep back to [1].\nBacktracking to the start.\n"
            "[2] 4+1=5 | at 5\n[2.1] 5x2=10 | at 10 (goal)\nSummary: [2.1] 4+1=5 -> 5x2=10\nAnswer: 4 -> 5 -> 10")
    s = parse_tree(text).stats()
    assert (s["nodes"], s["backtracks"], s["dead_ends"], s["goal_id"]) == (4, 2, 1, "2.1")


@pytest.mark.parametrize("name", sorted(GAMES))
@pytest.mark.parametrize("fmt", FORMATS)
def test_gold_traces_are_right_and_parse_back(name, fmt):
    game = get_game(name)
    for inst in game.instances("test", 8):
        path = game.solve(inst)
        trace = gold_trace(game, inst, fmt, random.Random(inst["id"]), width=3, detours=2, path=path)
        assert game.verify(inst, extract_answer(trace)).correct
        stats = parse_tree(trace).stats()
        if fmt == "cot":
            assert stats["nodes"] == 0 and trace.count("Step ") == len(path)
            continue
        assert stats["goal_marked"] and stats["has_summary"] and stats["orphans"] == 0
        summary = next(ln for ln in trace.splitlines() if ln.startswith("Summary: "))
        summary_id = summary[len("Summary: ["):summary.index("]")]
        assert summary_id in parse_tree(trace).goals  # the summary names a node marked as goal
        if fmt == "ats-dfs":
            assert summary_id == stats["goal_id"]  # DFS stops at its first goal
        assert stats["goal_id"].count(".") + 1 == len(path)  # the goal sits at the solution's depth
        if fmt == "ats-bfs":
            levels = [ln for ln in trace.splitlines() if ln.startswith("Level ")]
            assert len(levels) == len(path) and stats["max_branching"] <= 3
            assert all(sum(1 for ln in block.splitlines() if ln.startswith("[")) <= 3
                       for block in trace.split("Level ")[1:])


def test_dfs_traces_step_back_from_their_wrong_turns():
    game = get_game("numpath")
    backs = sum(parse_tree(gold_trace(game, inst, "ats-dfs", random.Random(0), detours=2)).stats()["backtracks"]
                for inst in game.instances("test", 20))
    assert backs >= 20  # two detours per trace, each climbed back at least once (some may hit a goal and be skipped)


def test_gold_trace_errors():
    game = get_game("numpath")
    inst = game.instances("test", 1)[0]
    with pytest.raises(VlkitError, match="unknown trace format"):
        gold_trace(game, inst, "tot", random.Random(0))
    with pytest.raises(VlkitError, match="no solution"):
        gold_trace(game, {**inst, "target": inst["target"] + 10_000}, "cot", random.Random(0))


def test_messages_per_style():
    game = get_game("game24")
    inst = game.instances("test", 1)[0]
    prompted = build_messages(game, inst, "ats-bfs")
    assert prompted[0] == {"role": "system", "content": SYSTEM["ats-bfs"]}
    assert "4 5 6 10" in prompted[1]["content"] and "Answer format" in prompted[1]["content"]
    assert build_messages(game, inst, "cot", "tuned") == [{"role": "user", "content": game.question(inst)}]
    with pytest.raises(VlkitError):
        build_messages(game, inst, "tot")


# -- backends: a scripted model, to pin the runner's and ToT's bookkeeping ----------------------------------


class Scripted:
    """A backend whose replies are computed by a function of the prompt text; counts words as tokens."""

    name, style = "scripted", "prompted"

    def __init__(self, reply):
        self.reply, self.calls = reply, []

    def complete(self, conversations, max_tokens, temperature=0.0):
        out = []
        for conv in conversations:
            prompt = "\n".join(m["content"] for m in conv)
            self.calls.append(prompt)
            text = self.reply(prompt)
            out.append(Completion(text, len(prompt.split()), len(text.split())))
        return out


def test_runner_judges_and_counts():
    game = get_game("arithmetic")
    insts = game.instances("test", 6)
    solutions = {game.question(i): game.answer(i, game.solve(i)) for i in insts}
    good = {game.question(i) for i in insts[:4]}

    def reply(prompt):
        q = next(q for q in solutions if q in prompt)
        return f"thinking\nAnswer: {solutions[q] if q in good else '1+1 = 2'}"

    backend = Scripted(reply)
    rows = run(game, insts, "cot", backend, chunk=4)
    assert [r["correct"] for r in rows] == [True] * 4 + [False] * 2
    assert all(r["calls"] == 1 and r["tree"] is None for r in rows)
    s = summarise(rows, price_prompt=2.0, price_completion=10.0)[0]
    prompt = sum(r["prompt_tokens"] for r in rows)
    completion = sum(r["completion_tokens"] for r in rows)
    assert s["solved"] == 4 and s["accuracy"] == pytest.approx(4 / 6)
    assert s["tokens_per_answer"] == pytest.approx(completion / 6)
    assert s["tokens_per_solved"] == pytest.approx((prompt + completion) / 4)
    assert s["cost_per_solved"] == pytest.approx((prompt * 2.0 + completion * 10.0) / 1e6 / 4)
    assert "| arithmetic | cot | 6 | 66.7% |" in table([s])


def test_summary_without_usage_reports_no_tokens():
    rows = [{"game": "g", "method": "io", "correct": True, "calls": 1, "prompt_tokens": None,
             "completion_tokens": None, "tree": None, "error": None}]
    s = summarise(rows, 1.0, 1.0)[0]
    assert s["tokens_per_answer"] is None and s["cost_per_solved"] is None and s["accuracy"] == 1.0


def oracle_tot(game, inst):
    """A model that proposes every legal move and values states by whether the exact solver can finish them."""
    def reply(prompt):
        moves_line = next(ln for ln in prompt.splitlines() if ln.startswith("Moves so far: "))
        done = [] if moves_line.endswith("none") else moves_line[len("Moves so far: "):].split(", ")
        state, path = game.start(inst), []
        for m in done:
            step = next(s for s in game.moves(inst, state) if s.move == m)
            state = step.state
            path.append(step)
        if prompt.startswith("You judge"):
            if game.complete(inst, state):
                return "sure" if game.is_goal(inst, state) else "impossible"
            rest = _finishable(game, inst, state, len(path))
            return "sure" if rest else "impossible"
        return "\n".join(s.move for s in game.moves(inst, state))
    return reply


def _finishable(game, inst, state, depth):
    if game.is_goal(inst, state):
        return True
    if depth >= game.max_depth(inst) or game.complete(inst, state):
        return False
    return any(_finishable(game, inst, s.state, depth + 1) for s in game.moves(inst, state))


@pytest.mark.parametrize("name", ["arithmetic", "numpath", "game24", "water"])
def test_tree_of_thoughts_solves_with_an_oracle_and_counts_calls(name):
    game = get_game(name)
    inst = game.instances("test", 3)[2]
    backend = Scripted(oracle_tot(game, inst))
    r = tree_of_thoughts(game, inst, backend, beam=2)
    assert game.verify(inst, r["answer"]).correct
    assert r["calls"] == len(backend.calls) > 2
    assert r["prompt_tokens"] == sum(len(p.split()) for p in backend.calls)


def test_tree_of_thoughts_with_a_useless_model_fails_cleanly():
    game = get_game("game24")
    inst = game.instances("test", 1)[0]
    r = tree_of_thoughts(game, inst, Scripted(lambda p: "I do not know"), beam=2)
    assert r["answer"] == "" and r["calls"] == 1
    assert not game.verify(inst, r["answer"]).correct


def test_value_words():
    assert value_of("I think this is LIKELY.") == 1.0 and value_of("sure") == 20.0 and value_of("hmm") == 0.0


def test_parse_move_reads_model_proposals():
    game = get_game("game24")
    inst = {"id": "x", "numbers": [4, 5, 6, 10], "goal": 24}
    start = game.start(inst)
    assert game.parse_move(inst, start, "1. 10 - 4 = 6 (left: 5 6 6)").move == "10-4=6"
    assert game.parse_move(inst, start, "4 × 6 = 24").move == "6*4=24"
    assert game.parse_move(inst, start, "14+5=19") is None  # not legal here, and no partial match
    assert game.parse_move(inst, start, "7+7=14") is None
