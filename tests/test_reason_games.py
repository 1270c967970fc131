"""Games, safe arithmetic, verifiers and solvers (vlkit.reason.games, vlkit.reason.arith)."""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest
from hypothesis import given, settings, strategies as st

from vlkit.errors import VlkitError
from vlkit.reason.arith import ArithError, parse
from vlkit.reason.check import check_all, check_game
from vlkit.reason.games import GAMES, extract_answer, get_game
from vlkit.reason.games.combine import load_game24
from vlkit.reason.games.grass import optimum

# -- safe arithmetic ---------------------------------------------------------------------------------


def test_parse_is_exact_and_lists_numbers():
    e = parse("8 / (3 - 8/3)")
    assert e.value == 24 and e.numbers == (8, 3, 8, 3)
    assert parse("(10-4)*5-6").value == 24
    assert parse("3 × 4 ÷ 2 − 1").value == 5
    assert parse("3x4").value == 12 and parse("(1+2) x (3+1)").value == 12
    assert parse("[2+2]*6").value == 24


@pytest.mark.parametrize("text", ["", "1/0", "3/(2-2)", "(1+2", "1+2)", "-3+27", "2**5", "4 4", "__import__('os')",
                                  "1e3", "2^3", "1234567+1", "(" * 40 + "1" + ")" * 40, "1+" * 150 + "1"])
def test_parse_refuses(text):
    with pytest.raises(ArithError):
        parse(text)


@st.composite
def expressions(draw, depth=0):
    """(text, exact value) of a random expression tree, computed without any parser."""
    if depth >= 3 or draw(st.booleans()):
        n = draw(st.integers(0, 99))
        return str(n), Fraction(n)
    (ta, va), (tb, vb) = draw(expressions(depth=depth + 1)), draw(expressions(depth=depth + 1))
    op = draw(st.sampled_from("+-*/"))
    if op == "/" and vb == 0:
        op = "*"
    value = {"+": va + vb, "-": va - vb, "*": va * vb, "/": va / vb if vb else None}[op]
    space = draw(st.sampled_from(["", " "]))
    return f"({ta}{space}{op}{space}{tb})", value


@settings(max_examples=300, deadline=None)
@given(expressions())
def test_parse_agrees_with_the_expression_tree(case):
    text, value = case
    assert parse(text).value == value


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("0123456789+-*/()x× .=abc")), max_size=60) | st.text(max_size=60))
def test_parse_raises_only_arith_errors(text):
    try:
        parse(text)
    except ArithError:
        pass


# -- answers and verifiers -----------------------------------------------------------------------------


@pytest.mark.parametrize("text,answer", [
    ("Step 1: ...\nAnswer: 4 -> 8", "4 -> 8"),
    ("blah\n**Final answer:** (1+2)*8 = 24\n", "(1+2)*8 = 24"),
    ("Answer:\n\nfill A, pour A into B", "fill A, pour A into B"),
    ("no marker here\nlast line", "last line"),
    ("Answer: first\nmore\nanswer: second", "second"),
    ("", ""),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_water_known_puzzle():
    g = get_game("water")
    inst = {"id": "x", "capacity_a": 3, "capacity_b": 5, "target": 4, "budget": 6}
    path = g.solve(inst)
    assert len(path) == 6  # the classic 3/5 -> 4 litres needs six moves
    assert g.verify(inst, g.answer(inst, path)).correct
    assert g.verify(inst, "Fill jug B; pour B to A; empty A; pour B into A; fill B; pour B into A").correct
    assert not g.verify({**inst, "budget": 5}, g.answer(inst, path)).correct  # over budget
    assert not g.verify(inst, "fill B, pour B into A").correct
    assert g.verify(inst, "nothing").reason == "no moves found"
    assert g.solve({**inst, "budget": 5}) is None


def test_numpath_verifier_reads_several_spellings():
    g = get_game("numpath")
    inst = {"id": "x", "start": 3, "target": 14, "steps": 3}
    for answer in ("3 -> 6 -> 7 -> 14", "6, 7, 14", "3x2=6, 6+1=7, 7x2=14", "3 → 6 → 7 → 14"):
        assert g.verify(inst, answer).correct, answer
    assert not g.verify(inst, "3 -> 6 -> 12 -> 14").correct
    assert not g.verify(inst, "3 -> 4 -> 7 -> 14").correct  # 4 -> 7 is neither step
    assert not g.verify(inst, "3 -> 7 -> 14").correct


def test_combine_verifier():
    g = get_game("game24")
    inst = {"id": "x", "numbers": [4, 5, 6, 10], "goal": 24}
    assert g.verify(inst, "(10 - 4) * 5 - 6 = 24").correct
    assert g.verify(inst, "24 = 5 * (10 - 6) + 4").correct
    assert not g.verify(inst, "(10 - 4) * 4 = 24").correct   # wrong numbers
    assert g.verify(inst, "10 + 5 + 6 + 4 = 24").reason == "equals 25, not 24"
    assert not g.verify(inst, "24").correct


def test_grass_optimum_and_verifier():
    g = get_game("grass")
    assert optimum((4, 9, 16)) == 81  # squares: x = y = 2, 3, 4 meets the Cauchy-Schwarz bound (2+3+4)^2
    for nums in [(6, 8, 12), (7, 11, 13), (36, 2, 5)]:  # the bound holds
        assert optimum(nums) >= sum(n ** 0.5 for n in nums) ** 2 - 1e-9
    inst = {"id": "x", "numbers": [4, 9, 16]}
    assert g.verify(inst, "16=4*4, 4=2*2, 9=3*3").correct  # any order
    assert not g.verify(inst, "4=1*4, 9=3*3, 16=4*4").correct  # valid but not minimal
    assert g.verify(inst, "4=2*2, 9=3*3, 16=2*8").reason.startswith("X*Y=")
    assert not g.verify(inst, "4=2*3, 9=3*3, 16=4*4").correct  # 2*3 is not 4


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(GAMES)), st.text(max_size=120))
def test_verifiers_never_raise_and_reject_noise(name, text):
    g = GAMES[name]
    inst = g.instances("test", 1)[0]
    verdict = g.verify(inst, text)
    assert isinstance(verdict.correct, bool) and verdict.reason


# -- instances, solvers against verifiers ------------------------------------------------------------------


def test_instances_are_deterministic_and_splits_disjoint():
    for name, g in GAMES.items():
        if name == "game24":
            continue
        a, b = g.instances("train", 100, seed=1), g.instances("train", 100, seed=1)
        assert a == b
        test = g.instances("test", 60, seed=1)
        assert not {g.key(i) for i in a} & {g.key(i) for i in test}
        assert len({g.key(i) for i in a}) == 100
    with pytest.raises(VlkitError, match="unknown split"):
        GAMES["water"].instances("dev", 3)


def test_game24_rows_and_split():
    g = get_game("game24")
    test = g.instances("test")
    assert len(test) == 100 and test[0]["numbers"] == [4, 5, 6, 10] and test[0]["row"] == 900
    assert len(g.instances("train")) == 1262 and len(g.instances("all")) == 1362


def test_game24_file_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("VLKIT_GAME24", str(tmp_path / "missing.csv"))
    with pytest.raises(VlkitError, match="missing.csv: Game of 24 data not found"):
        get_game("game24").instances("test")
    bad = tmp_path / "bad.csv"
    bad.write_text("Rank,Puzzles\n1,1 2 3 4\n2,1 2 x\n")
    with pytest.raises(VlkitError, match="row 1"):
        load_game24(str(bad))


def test_every_solver_passes_its_verifier():
    report = check_all(n=150)
    for name, r in report.items():
        assert r["wrong"] == [], name
    assert report["game24"]["instances"] == 1362
    assert report["game24"]["solvable"] == 1362  # every row of 24.csv has a solution


def test_check_catches_a_broken_solver():
    class Broken(type(get_game("numpath"))):
        def answer(self, inst, path):  # drops the last step
            return super().answer(inst, path[:-1])

    r = check_game(Broken(), get_game("numpath").instances("test", 5))
    assert len(r["wrong"]) == 5


def test_game24_solver_matches_an_independent_brute_force():
    """Solvability by a different method (every permutation and bracketing, signed subtraction) on a sample."""
    def values(nums):
        if len(nums) == 1:
            return {nums[0]}
        out = set()
        for i in range(1, len(nums)):
            for a in values(nums[:i]):
                for b in values(nums[i:]):
                    out |= {a + b, a - b, a * b} | ({a / b} if b else set())
        return out

    g = get_game("game24")
    rows = g.instances("all")[::50] + [{"id": "u", "numbers": [1, 1, 1, 1], "goal": 24}]
    for inst in rows:
        brute = any(24 in values([Fraction(n) for n in p]) for p in set(itertools.permutations(inst["numbers"])))
        assert (g.solve(inst) is not None) == brute, inst["numbers"]
