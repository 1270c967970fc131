"""Every exact solver against its verifier, on generated instances and on all Game of 24 rows."""

from __future__ import annotations

import time

from vlkit.reason.games import GAMES


def check_game(game, instances: list[dict]) -> dict:
    """Solve each instance, render the solution as a final answer, and have the verifier judge it."""
    t0 = time.perf_counter()
    unsolvable, wrong = [], []
    for inst in instances:
        path = game.solve(inst)
        if path is None:
            unsolvable.append(inst.get("row", inst["id"]))
            continue
        verdict = game.verify(inst, game.answer(inst, path))
        if not verdict.correct:
            wrong.append({"id": inst["id"], "answer": game.answer(inst, path), "reason": verdict.reason})
    return {"instances": len(instances), "solvable": len(instances) - len(unsolvable), "unsolvable": unsolvable,
            "wrong": wrong, "seconds": round(time.perf_counter() - t0, 2)}


def check_all(n: int = 500, seed: int = 0) -> dict:
    report = {}
    for name, game in GAMES.items():
        if name == "game24":
            report[name] = check_game(game, game.instances("all"))
        else:
            # the arithmetic and water puzzle spaces are small (876 and 1,084 distinct puzzles in all)
            caps = {"arithmetic": (min(n, 700), min(n, 130)), "water": (min(n, 900), min(n, 120))}.get(name, (n, n))
            instances = game.instances("train", caps[0], seed) + game.instances("test", caps[1], seed)
            report[name] = check_game(game, instances)
    return report
