"""Drop water: two jugs of given capacities, unlimited water; get exactly the target in one jug within a
budget of moves (fill, empty, or pour one jug into the other until it is empty or the other is full)."""

from __future__ import annotations

import re

from vlkit.reason.games.base import Game, Step, Verdict

_OP = re.compile(r"\b(fill|empty|pour)\s+(?:jug\s+)?([ab])\b(?:\s*(?:into|in|to|->|→|onto)\s*(?:jug\s+)?([ab])\b)?",
                 re.IGNORECASE)


def apply(op: str, a: int, b: int, cap_a: int, cap_b: int) -> tuple[int, int]:
    """The jugs after one move (op as written in answers, e.g. "pour A into B")."""
    if op == "fill A":
        return cap_a, b
    if op == "fill B":
        return a, cap_b
    if op == "empty A":
        return 0, b
    if op == "empty B":
        return a, 0
    if op == "pour A into B":
        d = min(a, cap_b - b)
        return a - d, b + d
    if op == "pour B into A":
        d = min(b, cap_a - a)
        return a + d, b - d
    raise ValueError(op)


OPS = ("fill A", "fill B", "empty A", "empty B", "pour A into B", "pour B into A")


class DropWater(Game):
    name = "water"

    def sample(self, rng) -> dict:
        while True:
            cap_a, cap_b = rng.sample(range(2, 21), 2)
            target = rng.randint(1, max(cap_a, cap_b) - 1)
            inst = {"capacity_a": cap_a, "capacity_b": cap_b, "target": target, "budget": 99}
            path = self.solve(inst)
            if path is not None and 2 <= len(path) <= 6:
                inst["budget"] = len(path) + rng.choice([0, 1, 2])
                return inst

    def key(self, inst: dict) -> str:  # the budget does not make another puzzle
        return f"{inst['capacity_a']},{inst['capacity_b']}->{inst['target']}"

    def question(self, inst: dict) -> str:
        return (f"Jug A holds {inst['capacity_a']} litres and jug B holds {inst['capacity_b']} litres; both start "
                f"empty. Get exactly {inst['target']} litres in one jug in at most {inst['budget']} moves. "
                "Moves: fill A, fill B, empty A, empty B, pour A into B, pour B into A.")

    def start(self, inst):
        return (0, 0)

    def moves(self, inst, state) -> list[Step]:
        a, b = state
        out = []
        for op in OPS:
            nxt = apply(op, a, b, inst["capacity_a"], inst["capacity_b"])
            if nxt != state:
                out.append(Step(op, nxt))
        return out

    def complete(self, inst, state) -> bool:
        return self.is_goal(inst, state)

    def is_goal(self, inst, state) -> bool:
        return inst["target"] in state

    def show(self, inst, state) -> str:
        return f"A={state[0]} B={state[1]}"

    def max_depth(self, inst) -> int:
        return inst["budget"]

    def answer(self, inst, path: list[Step]) -> str:
        return ", ".join(s.move for s in path)

    def verify(self, inst, answer: str) -> Verdict:
        ops = [f"{v.lower()} {j.upper()}" + (f" into {k.upper()}" if k else "") for v, j, k in _OP.findall(answer)]
        if not ops:
            return Verdict(False, "no moves found")
        if len(ops) > inst["budget"]:
            return Verdict(False, f"{len(ops)} moves, over the budget of {inst['budget']}")
        a = b = 0
        for op in ops:
            if op not in OPS:
                return Verdict(False, f"not a move: {op!r}")
            a, b = apply(op, a, b, inst["capacity_a"], inst["capacity_b"])
        if inst["target"] not in (a, b):
            return Verdict(False, f"ends with A={a} B={b}, not {inst['target']}")
        return Verdict(True, "ok")
