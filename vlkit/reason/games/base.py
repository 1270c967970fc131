"""What every puzzle game provides: instances, a search space, an exact solver and a verifier.

A game is a search problem: a start state, the legal moves from a state (each a `Step`: the move as
text plus the state it leads to), and which states answer the question. Methods write their search in
these terms (the ATS trees, the gold traces, Tree of Thoughts), and the verifier judges a model's
final answer from its text alone, by its own parsing and simulation.
"""

from __future__ import annotations

import random
import re
import zlib
from collections import deque
from dataclasses import dataclass
from typing import Hashable

from vlkit.errors import VlkitError

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Step:
    move: str        # the move as written in traces and answers, e.g. "4+5=9" or "pour A into B"
    state: Hashable  # the state it leads to


@dataclass(frozen=True)
class Verdict:
    correct: bool
    reason: str  # why not (or "ok")


_ANSWER = re.compile(r"^\W*(?:final\s+)?answer\s*(?:is)?\s*[:：=\-]?\s*(.*)$", re.IGNORECASE)


def extract_answer(text: str) -> str:
    """The final answer of a response: the text after the last "Answer:" (its line, or the next non-empty
    line when that is empty), else the last non-empty line."""
    # markdown emphasis and code marks go (a single * stays: it is multiplication)
    lines = [re.sub(r"\*\*|__|`", "", ln).strip() for ln in text.strip().splitlines()]
    for i in range(len(lines) - 1, -1, -1):
        m = _ANSWER.match(lines[i])
        if m:
            rest = m.group(1).strip()
            if rest:
                return rest
            return next((ln for ln in lines[i + 1:] if ln), "")
    return next((ln for ln in reversed(lines) if ln), "")


def split_of(key: str) -> str:
    """Held-out membership decided by the instance itself (1 in 8 is test), so that train and test never
    share an instance whatever sizes are asked for."""
    return "test" if zlib.crc32(key.encode()) % 8 == 0 else "train"


class Game:
    """Base class; subclasses define the search space and the checks."""

    name: str = ""

    # -- instances -------------------------------------------------------------------------------
    def instances(self, split: str, n: int, seed: int = 0) -> list[dict]:
        """n distinct instances of `split`, generated from `seed` (same arguments, same instances)."""
        if split not in SPLITS:
            raise VlkitError(f"{self.name}: unknown split {split!r}; choose one of {SPLITS}")
        rng = random.Random(f"{self.name}:{seed}")
        out, seen, tries = [], set(), 0
        while len(out) < n:
            tries += 1
            if tries > 200 * n + 10_000:
                raise VlkitError(f"{self.name}: could not generate {n} distinct {split} instances; ask for fewer")
            inst = self.sample(rng)
            key = self.key(inst)
            if key in seen or split_of(f"{self.name}:{key}") != split:
                continue
            seen.add(key)
            inst["id"] = f"{self.name}-{split}-{len(out):04d}"
            out.append(inst)
        return out

    def sample(self, rng) -> dict:
        """One random solvable instance (without its id)."""
        raise NotImplementedError

    def key(self, inst: dict) -> str:
        return repr(sorted((k, v) for k, v in inst.items() if k != "id"))

    # -- search space ----------------------------------------------------------------------------
    def question(self, inst: dict) -> str:
        raise NotImplementedError

    def start(self, inst: dict) -> Hashable:
        raise NotImplementedError

    def moves(self, inst: dict, state) -> list[Step]:
        raise NotImplementedError

    def complete(self, inst: dict, state) -> bool:
        """The state is a finished candidate answer (right or wrong): nothing further is asked."""
        raise NotImplementedError

    def is_goal(self, inst: dict, state) -> bool:
        raise NotImplementedError

    def show(self, inst: dict, state) -> str:
        """The state in a few words, as traces write it after a move."""
        raise NotImplementedError

    def max_depth(self, inst: dict) -> int:
        raise NotImplementedError

    def answer(self, inst: dict, path: list[Step]) -> str:
        """The final-answer text of a path of steps from the start."""
        raise NotImplementedError

    def verify(self, inst: dict, answer: str) -> Verdict:
        """Judge a final answer from its text alone (never trusts the search code above)."""
        raise NotImplementedError

    # -- solving ---------------------------------------------------------------------------------
    def solve(self, inst: dict) -> list[Step] | None:
        """A shortest path to a goal state (breadth-first, exact), or None when there is none."""
        start = self.start(inst)
        parent: dict = {start: None}
        queue = deque([(start, 0)])
        while queue:
            state, depth = queue.popleft()
            if self.is_goal(inst, state):
                path = []
                while parent[state] is not None:
                    prev, step = parent[state]
                    path.append(step)
                    state = prev
                return path[::-1]
            if depth >= self.max_depth(inst):
                continue
            for step in self.moves(inst, state):
                if step.state not in parent:
                    parent[step.state] = (state, step)
                    queue.append((step.state, depth + 1))
        return None

    def parse_move(self, inst: dict, state, text: str) -> Step | None:
        """The legal move from `state` that `text` names (for proposals written by a model), else None."""
        norm = _normalise(text)
        best, best_len = None, 0
        for step in self.moves(inst, state):
            for m in map(_normalise, self.spellings(step)):
                if len(m) > best_len and re.search(r"(?<![\w/])" + re.escape(m) + r"(?![\w/])", norm):
                    best, best_len = step, len(m)
        return best

    def spellings(self, step: Step) -> list[str]:
        """Ways a model may write this move (the canonical text first)."""
        return [step.move]


def _normalise(text: str) -> str:
    text = text.lower().replace("×", "*").replace("÷", "/").replace("−", "-")
    return re.sub(r"\s+", "", text)
