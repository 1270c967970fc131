"""Number path: from s reach t in exactly k steps, each step doubling the number (x2) or adding one (+1)."""

from __future__ import annotations

import re

from vlkit.reason.games.base import Game, Step, Verdict


class NumberPath(Game):
    name = "numpath"

    def sample(self, rng) -> dict:
        s, k = rng.randint(1, 50), rng.randint(3, 6)
        t = s
        for _ in range(k):
            t = t * 2 if rng.random() < 0.5 else t + 1
        return {"start": s, "target": t, "steps": k}

    def question(self, inst: dict) -> str:
        return (f"Start at {inst['start']} and reach {inst['target']} in exactly {inst['steps']} steps; each step "
                "either doubles the number (x2) or adds one (+1).")

    def start(self, inst):
        return (inst["start"], 0)

    def moves(self, inst, state) -> list[Step]:
        n, used = state
        if used >= inst["steps"] or n > inst["target"]:
            return []
        return [Step(f"{n}x2={2 * n}", (2 * n, used + 1)), Step(f"{n}+1={n + 1}", (n + 1, used + 1))]

    def complete(self, inst, state) -> bool:
        return state[1] == inst["steps"]

    def is_goal(self, inst, state) -> bool:
        return state == (inst["target"], inst["steps"])

    def show(self, inst, state) -> str:
        return f"at {state[0]}, {inst['steps'] - state[1]} steps left"

    def max_depth(self, inst) -> int:
        return inst["steps"]

    def answer(self, inst, path: list[Step]) -> str:
        return " -> ".join([str(inst["start"])] + [str(s.state[0]) for s in path])

    def verify(self, inst, answer: str) -> Verdict:
        if "=" in answer:  # moves written out, "3x2=6, 6+1=7": the results are the path
            nums = [int(x) for x in re.findall(r"=\s*(\d+)", answer)]
        else:  # the path as numbers, "3 -> 6 -> 7"; operator tokens ("x2", "+1") are not path numbers
            nums = [int(x) for x in re.findall(r"\d+", re.sub(r"(?:x|\*|×)\s*2\b|\+\s*1\b", " ", answer))]
        if not nums:
            return Verdict(False, "no numbers found")
        if nums[0] != inst["start"]:
            nums = [inst["start"]] + nums
        if len(nums) - 1 != inst["steps"]:
            return Verdict(False, f"{len(nums) - 1} steps, not {inst['steps']}")
        for a, b in zip(nums, nums[1:]):
            if b not in (2 * a, a + 1):
                return Verdict(False, f"{a} -> {b} is neither x2 nor +1")
        if nums[-1] != inst["target"]:
            return Verdict(False, f"ends at {nums[-1]}, not {inst['target']}")
        return Verdict(True, "ok")
