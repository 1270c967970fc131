"""Tree of Thoughts baseline (Yao et al. 2023): the program runs a breadth-first search and calls the model to
propose next moves from each state and to value each new state (sure / likely / impossible); the `beam` best
states are kept per level. Many calls per instance: that is the cost ATS avoids.
"""

from __future__ import annotations

import re

from vlkit.reason.backends import Backend, Completion
from vlkit.reason.games import Game, Step

VALUES = {"sure": 20.0, "likely": 1.0, "impossible": 0.001}  # ToT's value map for the Game of 24

PROPOSE = ("You help solve a puzzle one move at a time.\nPuzzle: {question}\nMoves so far: {moves}\n"
           "State now: {state}\nList up to {k} possible next moves, one per line, written like: {example}")
VALUE = ("You judge puzzle states.\nPuzzle: {question}\nMoves so far: {moves}\nState now: {state}\n"
         "Can the puzzle still be solved from here? Answer with one word: sure, likely or impossible.")


def value_of(text: str) -> float:
    m = re.search(r"\b(sure|likely|impossible)\b", text, re.IGNORECASE)
    return VALUES[m.group(1).lower()] if m else 0.0


def tree_of_thoughts(game: Game, inst: dict, backend: Backend, beam: int = 3, proposals: int = 5,
                     max_tokens: int = 128) -> dict:
    """Solve one instance; returns the answer, a log of the search, and the token counts of all calls."""
    calls: list[Completion] = []
    log: list[str] = []
    start = game.start(inst)
    example = game.moves(inst, start)[0].move
    frontier: list[tuple[float, list[Step]]] = [(0.0, [])]

    def state_of(path):
        return path[-1].state if path else start

    def ask(prompts: list[str]) -> list[Completion]:
        got = backend.complete([[{"role": "user", "content": p}] for p in prompts], max_tokens)
        calls.extend(got)
        return got

    def context(path):
        return {"question": game.question(inst), "moves": ", ".join(s.move for s in path) or "none",
                "state": game.show(inst, state_of(path))}

    for depth in range(game.max_depth(inst)):
        open_paths = [p for _, p in frontier if not game.complete(inst, state_of(p))]
        if not open_paths:
            break
        proposed = ask([PROPOSE.format(k=proposals, example=example, **context(p)) for p in open_paths])
        children, seen = [], set()
        for path, reply in zip(open_paths, proposed):
            for line in reply.text.splitlines()[: proposals * 2]:
                step = game.parse_move(inst, state_of(path), line)
                if step is not None and (step.state, len(path)) not in seen:
                    seen.add((step.state, len(path)))
                    children.append(path + [step])
        log.append(f"level {depth + 1}: {len(children)} legal proposals from {len(open_paths)} states")
        if not children:
            break
        values = [value_of(c.text) for c in ask([VALUE.format(**context(p)) for p in children])]
        ranked = sorted(zip(values, children), key=lambda vc: -vc[0])
        frontier = [(v, p) for v, p in ranked[:beam]] + [(v, p) for v, p in frontier
                                                          if game.complete(inst, state_of(p))]
        frontier.sort(key=lambda vc: -vc[0])
        log += [f"  {v:g} {' -> '.join(s.move for s in p)} | {game.show(inst, state_of(p))}" for v, p in frontier]
        if game.complete(inst, state_of(frontier[0][1])):  # the best state is a finished answer
            break
    done = [(v, p) for v, p in frontier if p and game.complete(inst, state_of(p))]
    answer = game.answer(inst, done[0][1]) if done else ""
    return {"response": "\n".join(log + [f"Answer: {answer}"]), "answer": answer, "calls": len(calls),
            "prompt_tokens": _total(c.prompt_tokens for c in calls),
            "completion_tokens": _total(c.completion_tokens for c in calls),
            "errors": [c.error for c in calls if c.error]}


def _total(counts) -> int | None:
    counts = list(counts)
    return None if any(c is None for c in counts) else sum(counts)
