"""Combine numbers to a goal: the arithmetic game (three numbers from 1 to 13, a goal in {6, 8, 12, 16, 18, 24}, two
operations) and the Game of 24 (four numbers from the public 24.csv, three operations).

A move takes two of the numbers left and replaces them by their sum, product, difference (larger minus
smaller) or quotient; values are exact fractions. A state is the tuple of (value, expression) left.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

from vlkit.errors import VlkitError
from vlkit.reason.arith import ArithError, parse, show
from vlkit.reason.games.base import SPLITS, Game, Step, Verdict

GOALS = (6, 8, 12, 16, 18, 24)
ROOT = Path(__file__).resolve().parents[3]
TEST_ROWS = range(900, 1000)  # the usual Game of 24 test split: 0-based rows 900-999


def _operand(value: Fraction) -> str:
    return show(value) if value.denominator == 1 else f"({show(value)})"


def combinations(a: tuple[Fraction, str], b: tuple[Fraction, str]) -> list[tuple[str, Fraction, str]]:
    """(move text, value, expression) for each way to combine two numbers."""
    (x, ex), (y, ey) = (a, b) if a[0] >= b[0] else (b, a)
    out = [(f"{_operand(x)}+{_operand(y)}", x + y, f"({ex}+{ey})"),
           (f"{_operand(x)}*{_operand(y)}", x * y, f"{_wrap(ex)}*{_wrap(ey)}"),
           (f"{_operand(x)}-{_operand(y)}", x - y, f"({ex}-{_wrap(ey)})")]
    if y != 0:
        out.append((f"{_operand(x)}/{_operand(y)}", x / y, f"{_wrap(ex)}/{_wrap(ey)}"))
    if x != 0 and x != y:
        out.append((f"{_operand(y)}/{_operand(x)}", y / x, f"{_wrap(ey)}/{_wrap(ex)}"))
    return [(f"{text}={show(v)}", v, e) for text, v, e in out]


def _wrap(expr: str) -> str:
    return expr if expr.isdigit() or (expr.startswith("(") and _balanced_outer(expr)) else f"({expr})"


def _balanced_outer(expr: str) -> bool:
    """Whether the first parenthesis closes at the very end, e.g. (4+5) but not (4+5)*(6-1)."""
    depth = 0
    for i, c in enumerate(expr):
        depth += c == "("
        depth -= c == ")"
        if depth == 0:
            return i == len(expr) - 1
    return False


def _strip(expr: str) -> str:
    while expr.startswith("(") and _balanced_outer(expr):
        expr = expr[1:-1]
    return expr


class Combine(Game):
    """Shared by the arithmetic game and the Game of 24."""

    def question(self, inst: dict) -> str:
        nums = " ".join(str(n) for n in inst["numbers"])
        return (f"Use the numbers {nums}, each exactly once, with + - * / and parentheses to make {inst['goal']}.")

    def start(self, inst):
        return tuple((Fraction(n), str(n)) for n in inst["numbers"])

    def moves(self, inst, state) -> list[Step]:
        out = []
        for i in range(len(state)):
            for j in range(i + 1, len(state)):
                rest = state[:i] + state[i + 1:j] + state[j + 1:]
                for text, value, expr in combinations(state[i], state[j]):
                    out.append(Step(text, rest + ((value, expr),)))
        return out

    def spellings(self, step: Step) -> list[str]:
        """Also the operands swapped for + and * (4*6=24 as well as 6*4=24)."""
        lhs, result = step.move.rsplit("=", 1)
        for op in "+*":
            a, sep, b = lhs.partition(op)
            if sep and a and b and "/" not in a + b:
                return [step.move, f"{b}{op}{a}={result}"]
        return [step.move]

    def complete(self, inst, state) -> bool:
        return len(state) == 1

    def is_goal(self, inst, state) -> bool:
        return len(state) == 1 and state[0][0] == inst["goal"]

    def show(self, inst, state) -> str:
        return "left: " + " ".join(show(v) for v, _ in state)

    def max_depth(self, inst) -> int:
        return len(inst["numbers"]) - 1

    def answer(self, inst, path: list[Step]) -> str:
        return f"{_strip(path[-1].state[0][1])} = {inst['goal']}"

    def verify(self, inst, answer: str) -> Verdict:
        parts = [p for p in answer.split("=") if any(op in p for op in "+-*/×÷x")]
        if not parts:
            return Verdict(False, "no expression found")
        try:
            expr = parse(parts[0])
        except ArithError as e:
            return Verdict(False, f"not an expression: {e}")
        if Counter(expr.numbers) != Counter(inst["numbers"]):
            return Verdict(False, f"uses {sorted(expr.numbers)}, not each of {sorted(inst['numbers'])} once")
        if expr.value != inst["goal"]:
            return Verdict(False, f"equals {show(expr.value)}, not {inst['goal']}")
        return Verdict(True, "ok")

    def solve(self, inst: dict) -> list[Step] | None:
        return _solve(self, tuple(inst["numbers"]), inst["goal"])

    def key(self, inst: dict) -> str:
        return f"{sorted(inst['numbers'])}->{inst['goal']}"


@lru_cache(maxsize=4096)
def _solve(game: Combine, numbers: tuple, goal: int) -> list[Step] | None:
    """Depth-first (every path has the same length); cached, as splits and checks ask repeatedly."""
    inst = {"numbers": list(numbers), "goal": goal}

    def dfs(state) -> list[Step] | None:
        if len(state) == 1:
            return [] if state[0][0] == goal else None
        for step in game.moves(inst, state):
            rest = dfs(step.state)
            if rest is not None:
                return [step] + rest
        return None

    return dfs(game.start(inst))


class Arithmetic(Combine):
    name = "arithmetic"

    def sample(self, rng) -> dict:
        while True:
            inst = {"numbers": [rng.randint(1, 13) for _ in range(3)], "goal": rng.choice(GOALS)}
            if self.solve(inst) is not None:
                return inst


def game24_csv() -> Path:
    return Path(os.environ.get("VLKIT_GAME24", ROOT.parent / "shared" / "data" / "game24" / "24.csv"))


@lru_cache(maxsize=4)
def load_game24(path: str) -> tuple[tuple[int, ...], ...]:
    """The puzzles of 24.csv in file order (easy to hard). One-line errors name the file and row."""
    p = Path(path)
    if not p.is_file():
        raise VlkitError(f"{p}: Game of 24 data not found; set VLKIT_GAME24 to 24.csv "
                         "(../shared/data/game24/24.csv)")
    rows = []
    with p.open(newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            try:
                nums = tuple(int(x) for x in row["Puzzles"].split())
            except (KeyError, ValueError, AttributeError):
                raise VlkitError(f"{p}: row {i}: column 'Puzzles' must hold four integers") from None
            if len(nums) != 4:
                raise VlkitError(f"{p}: row {i}: column 'Puzzles' must hold four integers, got {len(nums)}")
            rows.append(nums)
    return tuple(rows)


class Game24(Combine):
    name = "game24"

    def instances(self, split: str, n: int | None = None, seed: int = 0) -> list[dict]:
        """Rows of 24.csv: test = rows 900-999, train = every other row; `seed` is unused (the data is fixed)."""
        if split not in SPLITS + ("all",):
            raise VlkitError(f"game24: unknown split {split!r}; choose train, test or all")
        rows = load_game24(str(game24_csv()))
        index = {"test": list(TEST_ROWS), "train": [i for i in range(len(rows)) if i not in TEST_ROWS],
                 "all": list(range(len(rows)))}[split]
        picked = index if n is None else index[:n]
        return [{"id": f"game24-{i:04d}", "numbers": list(rows[i]), "goal": 24, "row": i} for i in picked]
