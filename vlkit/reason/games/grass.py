"""Minimal grass: write each of three numbers n_i as a product x_i*y_i of positive integers, and make
X*Y smallest, where X = x_1 + x_2 + x_3 and Y = y_1 + y_2 + y_3 (our reading of the paper's game).

By Cauchy-Schwarz X*Y >= (sum of sqrt(n_i))^2, with equality when all x_i/y_i are equal; the search
has to weigh balanced factors against aligned shapes.
"""

from __future__ import annotations

import itertools
import re
from functools import lru_cache

from vlkit.reason.games.base import Game, Step, Verdict


def factor_pairs(n: int) -> list[tuple[int, int]]:
    return [(x, n // x) for x in range(1, n + 1) if n % x == 0]


@lru_cache(maxsize=4096)
def optimum(numbers: tuple[int, ...]) -> int:
    """The smallest X*Y (exhaustive over every factorisation of every number)."""
    best = None
    for pairs in itertools.product(*(factor_pairs(n) for n in numbers)):
        area = sum(x for x, _ in pairs) * sum(y for _, y in pairs)
        best = area if best is None else min(best, area)
    return best


class MinimalGrass(Game):
    name = "grass"

    def sample(self, rng) -> dict:
        return {"numbers": [rng.randint(4, 36) for _ in range(3)]}

    def key(self, inst: dict) -> str:
        return str(inst["numbers"])

    def question(self, inst: dict) -> str:
        a, b, c = inst["numbers"]
        return (f"Write each of {a}, {b}, {c} as a product x*y of positive integers. With X the sum of the three "
                "x and Y the sum of the three y, make X*Y as small as possible.")

    def start(self, inst):
        return ()

    def moves(self, inst, state) -> list[Step]:
        if len(state) == len(inst["numbers"]):
            return []
        n = inst["numbers"][len(state)]
        return [Step(f"{n}={x}*{y}", state + ((x, y),)) for x, y in factor_pairs(n)]

    def complete(self, inst, state) -> bool:
        return len(state) == len(inst["numbers"])

    def is_goal(self, inst, state) -> bool:
        return self.complete(inst, state) and _area(state) == optimum(tuple(inst["numbers"]))

    def show(self, inst, state) -> str:
        X, Y = sum(x for x, _ in state), sum(y for _, y in state)
        return f"X={X} Y={Y}" + (f" X*Y={X * Y}" if self.complete(inst, state) else "")

    def max_depth(self, inst) -> int:
        return len(inst["numbers"])

    def answer(self, inst, path: list[Step]) -> str:
        return ", ".join(s.move for s in path) + f"; X*Y={_area(path[-1].state)}"

    def verify(self, inst, answer: str) -> Verdict:
        found = [(int(n), int(x), int(y)) for n, x, y in
                 re.findall(r"(\d+)\s*=\s*(\d+)\s*(?:\*|x|×|·)\s*(\d+)", answer, flags=re.IGNORECASE)]
        if sorted(n for n, _, _ in found) != sorted(inst["numbers"]):
            return Verdict(False, f"needs one n=x*y for each of {inst['numbers']}, found {len(found)}")
        for n, x, y in found:
            if x * y != n:
                return Verdict(False, f"{x}*{y} is not {n}")
        area = sum(x for _, x, _ in found) * sum(y for _, _, y in found)
        best = optimum(tuple(inst["numbers"]))
        if area != best:
            return Verdict(False, f"X*Y={area}, the minimum is smaller")
        return Verdict(True, "ok")

    def solve(self, inst: dict) -> list[Step] | None:
        """The first leaf (in move order) with the smallest X*Y."""
        best, path = None, None

        def dfs(state, steps):
            nonlocal best, path
            if self.complete(inst, state):
                if best is None or _area(state) < best:
                    best, path = _area(state), list(steps)
                return
            for step in self.moves(inst, state):
                dfs(step.state, steps + [step])

        dfs(self.start(inst), [])
        return path


def _area(state) -> int:
    return sum(x for x, _ in state) * sum(y for _, y in state)
