"""The prompting methods: IO, CoT, ATS-BFS and ATS-DFS (one response each), and how a question is put.

ATS (Zhang, Ye, Shen, Gan 2023, Sec. 3) asks for the whole tree search in one reply, from a fixed system
prompt: BFS lists candidate nodes level by level, each with a tree id and its full path, marks the goal
and ends with a summary path; DFS extends one node at a time and writes explicit step-back lines. The
system prompts below are written for vlkit, with that structure; the worked example is a small graph
walk that is none of the games.

Two prompt styles: `prompted` (system prompt + question + answer format; for capable models used
zero-shot) and `tuned` (the bare question; what the `ats` recipe trains on, so a tuned model is asked
exactly as it was taught).
"""

from __future__ import annotations

from vlkit.errors import VlkitError
from vlkit.reason.games import Game

METHODS = ("io", "cot", "ats-bfs", "ats-dfs", "tot")
STYLES = ("prompted", "tuned")

_FINAL = "End with the final answer on its own line: `Answer: ...`."

_EXAMPLE_BFS = """Example (a walk through rooms S, K, H, G; doors S-K, S-H, K-H, H-G; reach G in two moves):
Level 1:
[1] S>K | at K
[2] S>H | at H
Level 2:
[1.1] S>K -> K>H | at H (dead end)
[2.1] S>H -> H>K | at K (dead end)
[2.2] S>H -> H>G | at G (goal)
Summary: [2.2] S>H -> H>G
Answer: S>H, H>G"""

_EXAMPLE_DFS = """Example (a walk through rooms S, K, H, G; doors S-K, S-H, K-H, H-G; reach G in two moves):
[1] S>K | at K
[1.1] K>H | at H (dead end)
Step back to [1].
Step back to the start.
[2] S>H | at H
[2.1] H>G | at G (goal)
Summary: [2.1] S>H -> H>G
Answer: S>H, H>G"""

SYSTEM = {
    "io": "Solve the puzzle. Give only the final answer, on one line: `Answer: ...`.",
    "cot": ("Solve the puzzle step by step. Write one move per line as `Step n: move | state after it`, "
            "then the final answer. " + _FINAL),
    "ats-bfs": (
        "You solve puzzles by writing out a breadth-first tree search in a single reply.\n"
        "- Go level by level. Under `Level d:` list the candidate moves from the nodes of the level above.\n"
        "- Give every node an id: its parent's id, a dot, and its number among its siblings (1, 2, 1.1, 2.3). "
        "Write `[id] full path of moves from the start | state after the last move`.\n"
        "- Check each node: mark one that solves the puzzle with (goal) and one that cannot go on with "
        "(dead end).\n"
        "- Stop after the first level with a goal. Write `Summary: [id] path` for that goal. " + _FINAL + "\n"
        + _EXAMPLE_BFS),
    "ats-dfs": (
        "You solve puzzles by writing out a depth-first tree search in a single reply.\n"
        "- Extend one node at a time: `[id] move | state after it`, where the id is the parent's id, a dot, "
        "and the node's number among its siblings (1, 1.1, 1.2, 2.1).\n"
        "- When a node is a dead end, mark it (dead end) and write `Step back to [parent id].` (or `Step back to "
        "the start.`), then try the parent's next move.\n"
        "- Mark the node that solves the puzzle with (goal), write `Summary: [id] full path`. " + _FINAL + "\n"
        + _EXAMPLE_DFS),
}

ANSWER_FORMAT = {
    "water": "the moves in order, separated by commas, e.g. fill A, pour A into B",
    "numpath": "the numbers visited, e.g. 3 -> 6 -> 7",
    "arithmetic": "one expression and its value, e.g. (7-3)*2 = 8",
    "game24": "one expression and its value, e.g. (7-3)*(2+4) = 24",
    "grass": "n=x*y for each number and the product, e.g. 6=2*3, 8=2*4, 9=3*3; X*Y=70",
}


def build_messages(game: Game, inst: dict, method: str, style: str = "prompted") -> list[dict]:
    """The chat messages that ask `method` to solve `inst` (one-response methods; ToT builds its own)."""
    if method not in METHODS or method == "tot":
        raise VlkitError(f"unknown one-response method {method!r}; choose one of {list(SYSTEM)}")
    if style not in STYLES:
        raise VlkitError(f"unknown prompt style {style!r}; choose one of {STYLES}")
    if style == "tuned":
        return [{"role": "user", "content": game.question(inst)}]
    return [{"role": "system", "content": SYSTEM[method]},
            {"role": "user", "content": f"{game.question(inst)}\nAnswer format: {ANSWER_FORMAT[game.name]}."}]
