"""Gold traces from the exact solvers, in the formats the methods ask for: CoT, ATS-BFS and ATS-DFS.

These are the fine-tuning data of the `ats` recipe (the paper collects them from GPT-4; here the solver
writes them, so every trace is correct): the same instance, the same solution path, three ways of
writing the search. BFS traces list at most `width` nodes per level (always including the solution's
node, the others drawn at random from the legal moves); DFS traces take up to `detours` wrong turns
(random dead-end branches) before following the solution, and step back from each.
"""

from __future__ import annotations

import random

from vlkit.errors import VlkitError
from vlkit.reason.games import Game, Step

FORMATS = ("cot", "ats-bfs", "ats-dfs")


def gold_trace(game: Game, inst: dict, fmt: str, rng: random.Random, width: int = 3, detours: int = 2,
               path: list[Step] | None = None) -> str:
    """The response a perfect solver writes for `inst` in format `fmt` (`path`: the solution, default the
    game's own)."""
    path = path if path is not None else game.solve(inst)
    if path is None:
        raise VlkitError(f"{inst.get('id')}: no solution, so no gold trace")
    if fmt == "cot":
        lines = [f"Step {i}: {s.move} | {game.show(inst, s.state)}" for i, s in enumerate(path, 1)]
    elif fmt == "ats-bfs":
        lines = _bfs(game, inst, path, rng, width)
    elif fmt == "ats-dfs":
        lines = _dfs(game, inst, path, rng, detours)
    else:
        raise VlkitError(f"unknown trace format {fmt!r}; choose one of {FORMATS}")
    return "\n".join(lines + [f"Answer: {game.answer(inst, path)}"])


def _mark(game: Game, inst: dict, state, depth: int) -> str:
    if game.is_goal(inst, state):
        return " (goal)"
    if game.complete(inst, state) or depth >= game.max_depth(inst) or not game.moves(inst, state):
        return " (dead end)"
    return ""


def _bfs(game: Game, inst: dict, path: list[Step], rng: random.Random, width: int) -> list[str]:
    lines: list[str] = []
    # a listed node: (id, moves from the start, state)
    frontier = [("", [], game.start(inst))]
    for depth, sol in enumerate(path):
        on_path = [s.move for s in path[:depth]]
        candidates = []  # (parent rank, move rank, parent id, moves, step)
        for rank, (pid, moves, state) in enumerate(frontier):
            if game.complete(inst, state):
                continue
            for k, step in enumerate(game.moves(inst, state)):
                candidates.append((rank, k, pid, moves, step))
        solution = next(c for c in candidates if c[3] == on_path and c[4].move == sol.move)
        others = [c for c in candidates if c is not solution]
        listed = sorted([solution] + rng.sample(others, min(width - 1, len(others))), key=lambda c: c[:2])
        lines.append(f"Level {depth + 1}:")
        counts: dict[str, int] = {}
        frontier = []
        for cand in listed:
            _, _, pid, moves, step = cand
            counts[pid] = counts.get(pid, 0) + 1
            nid = f"{pid}.{counts[pid]}" if pid else str(counts[pid])
            if cand is solution:
                sol_id = nid
            full = moves + [step.move]
            mark = _mark(game, inst, step.state, depth + 1)
            lines.append(f"[{nid}] {' -> '.join(full)} | {game.show(inst, step.state)}{mark}")
            if not mark:
                frontier.append((nid, full, step.state))
    # the summary names the solution's node (another goal may be listed beside it on the last level)
    return lines + [f"Summary: [{sol_id}] {' -> '.join(s.move for s in path)}"]


def _dfs(game: Game, inst: dict, path: list[Step], rng: random.Random, detours: int) -> list[str]:
    lines: list[str] = []
    detour_at = set(rng.sample(range(len(path)), min(detours, len(path))))
    pid, state, depth = "", game.start(inst), 0
    for depth, sol in enumerate(path):
        n = 0
        if depth in detour_at:
            wrong = [s for s in game.moves(inst, state) if s.move != sol.move]
            chain = _dead_chain(game, inst, rng.choice(wrong), depth + 1, rng) if wrong else None
            if chain:
                n += 1
                cid = f"{pid}.{n}" if pid else str(n)
                ids = [cid]
                for step in chain[1:]:
                    ids.append(ids[-1] + ".1")
                for k, (nid, step) in enumerate(zip(ids, chain)):
                    mark = _mark(game, inst, step.state, depth + 1 + k)
                    lines.append(f"[{nid}] {step.move} | {game.show(inst, step.state)}{mark}")
                for nid in reversed(ids[:-1]):  # climb back to the node where the wrong turn was taken
                    lines.append(f"Step back to [{nid}].")
                lines.append(f"Step back to [{pid}]." if pid else "Step back to the start.")
        n += 1
        pid = f"{pid}.{n}" if pid else str(n)
        state = sol.state
        lines.append(f"[{pid}] {sol.move} | {game.show(inst, state)}{_mark(game, inst, state, depth + 1)}")
    return lines + [f"Summary: [{pid}] {' -> '.join(s.move for s in path)}"]


def _dead_chain(game: Game, inst: dict, first: Step, depth: int, rng: random.Random) -> list[Step] | None:
    """A random line of play from `first` to a dead end (no goal on the way), or None if it finds a goal."""
    chain = [first]
    while not game.complete(inst, chain[-1].state) and depth < game.max_depth(inst):
        nxt = game.moves(inst, chain[-1].state)
        if not nxt:
            break
        chain.append(rng.choice(nxt))
        depth += 1
    if any(game.is_goal(inst, s.state) for s in chain):
        return None
    return chain
