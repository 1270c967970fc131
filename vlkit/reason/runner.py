"""Run a method on a game's instances through a backend: one row per instance (answer, verdict, tokens,
tree statistics), and a summary per game and method (accuracy, tokens per answer, cost per solved)."""

from __future__ import annotations

from vlkit.console import bar
from vlkit.errors import VlkitError
from vlkit.reason.backends import Backend
from vlkit.reason.games import Game, extract_answer
from vlkit.reason.methods import METHODS, build_messages
from vlkit.reason.tot import tree_of_thoughts
from vlkit.reason.tree import parse_tree


def run(game: Game, instances: list[dict], method: str, backend: Backend, max_tokens: int = 512,
        beam: int = 3, chunk: int = 16, progress: bool | None = None) -> list[dict]:
    """Solve each instance with `method`; every answer is judged by the game's verifier."""
    if method not in METHODS:
        raise VlkitError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    rows = []
    with bar(total=len(instances), desc=f"{game.name} {method}", enabled=progress) as pb:
        if method == "tot":
            for inst in instances:
                r = tree_of_thoughts(game, inst, backend, beam=beam, max_tokens=min(max_tokens, 256))
                rows.append(_row(game, inst, method, backend, r["response"], r["answer"], r["calls"],
                                 r["prompt_tokens"], r["completion_tokens"], "; ".join(r["errors"]) or None))
                pb.update(1)
            return rows
        for i in range(0, len(instances), chunk):
            part = instances[i:i + chunk]
            done = backend.complete([build_messages(game, inst, method, backend.style) for inst in part], max_tokens)
            for inst, c in zip(part, done):
                rows.append(_row(game, inst, method, backend, c.text, extract_answer(c.text), 1, c.prompt_tokens,
                                 c.completion_tokens, c.error))
            pb.update(len(part))
    return rows


def _row(game, inst, method, backend, response, answer, calls, prompt_tokens, completion_tokens, error) -> dict:
    verdict = game.verify(inst, answer)
    return {"id": inst["id"], "game": game.name, "method": method, "model": backend.name, "style": backend.style,
            "answer": answer, "correct": verdict.correct, "reason": verdict.reason, "calls": calls,
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "tree": parse_tree(response).stats() if method.startswith("ats") else None,
            "error": error, "response": response}


def summarise(rows: list[dict], price_prompt: float = 0.0, price_completion: float = 0.0) -> list[dict]:
    """Per (game, method): accuracy, tokens per answer and per solved instance, cost per solved (prices in
    currency units per million tokens; cost is None when no price is given or a server sent no usage)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["game"], r["method"]), []).append(r)
    out = []
    for (game, method), rs in groups.items():
        solved = sum(r["correct"] for r in rs)
        counted = all(r["prompt_tokens"] is not None and r["completion_tokens"] is not None for r in rs)
        prompt = sum(r["prompt_tokens"] or 0 for r in rs)
        completion = sum(r["completion_tokens"] or 0 for r in rs)
        cost = (prompt * price_prompt + completion * price_completion) / 1e6
        trees = [r["tree"] for r in rs if r["tree"]]
        out.append({
            "game": game, "method": method, "n": len(rs), "solved": solved, "accuracy": solved / len(rs),
            "calls_per_instance": sum(r["calls"] for r in rs) / len(rs),
            "prompt_tokens_per_instance": prompt / len(rs) if counted else None,
            "tokens_per_answer": completion / len(rs) if counted else None,
            "tokens_per_solved": (prompt + completion) / solved if counted and solved else None,
            "cost_per_solved": cost / solved if counted and solved and (price_prompt or price_completion) else None,
            "goal_marked": sum(t["goal_marked"] for t in trees) / len(trees) if trees else None,
            "tree_nodes": sum(t["nodes"] for t in trees) / len(trees) if trees else None,
            "errors": sum(r["error"] is not None for r in rs),
        })
    return out


def table(summary: list[dict]) -> str:
    """The summary as a markdown table."""
    def num(v, digits=1):
        return "-" if v is None else f"{v:.{digits}f}"

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    lines = ["| game | method | n | accuracy | tokens/answer | prompt tokens | calls | tokens/solved | cost/solved "
             "| goal marked | tree nodes |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['game']} | {s['method']} | {s['n']} | {pct(s['accuracy'])} | {num(s['tokens_per_answer'])} "
                     f"| {num(s['prompt_tokens_per_instance'])} | {num(s['calls_per_instance'])} "
                     f"| {num(s['tokens_per_solved'])} | {num(s['cost_per_solved'], 4)} | {pct(s['goal_marked'])} "
                     f"| {num(s['tree_nodes'])} |")
    return "\n".join(lines)
