"""Rebuild the search tree from an ATS answer: nodes, depth, branching, backtracks, whether a goal was marked.

Models format loosely, so the parser accepts ids written [1.2], (1.2), 1.2:, **[1.2]**, `Node 1.2 -`,
bullets and stray markdown; goal marks "(goal)", "goal reached", a check mark; step-back lines in a few
phrasings. It never raises on text: malformed lines are skipped and counted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_CLEAN = re.compile(r"[*`_#]+|^\s*>+")
_NODE = re.compile(r"^\s*(?:[-•]\s*)?(?:node\s*)?[\[(]?\s*(\d{1,3}(?:\s*\.\s*\d{1,3}){0,30})\s*[\])]?"  # the id
                   r"\s*[:.)\-]?\s+([^\s=+*/].*)$", re.IGNORECASE)  # the node's text (not "= ..." arithmetic)
_GOAL = re.compile(r"\(\s*goal[^)]*\)|goal\s+(?:reached|found)|reach(?:es|ed)?\s+the\s+goal|✓|✔|\bsolved\b",
                   re.IGNORECASE)
_DEAD = re.compile(r"dead[\s-]*end|no\s+further|cannot\s+go\s+on|\bfail(?:ed|s)?\b", re.IGNORECASE)
_BACK = re.compile(r"\b(?:step(?:ping|s)?\s+back|backtrack(?:ing|s)?|go(?:ing)?\s+back)\b", re.IGNORECASE)
_LEVEL = re.compile(r"^\s*level\s*\d+\s*:?\s*$", re.IGNORECASE)
_SUMMARY = re.compile(r"^\s*summary\b", re.IGNORECASE)


@dataclass
class Tree:
    nodes: dict[str, str] = field(default_factory=dict)  # id -> the node's text (first occurrence)
    goals: list[str] = field(default_factory=list)       # ids marked as goal, in order
    dead_ends: int = 0
    backtracks: int = 0
    has_summary: bool = False
    skipped_lines: int = 0  # non-empty lines that are neither nodes nor known structure

    def children(self, node_id: str) -> list[str]:
        prefix = node_id + "."
        return [n for n in self.nodes if n.startswith(prefix) and "." not in n[len(prefix):]]

    def stats(self) -> dict:
        ids = list(self.nodes)
        parents = {n.rsplit(".", 1)[0] for n in ids if "." in n}
        internal = [p for p in parents if p in self.nodes] + (["root"] if ids else [])
        roots = [n for n in ids if "." not in n]
        fan = [len(roots) if p == "root" else len(self.children(p)) for p in internal]
        orphans = sum(1 for n in ids if "." in n and n.rsplit(".", 1)[0] not in self.nodes)
        return {"nodes": len(ids), "depth": max((n.count(".") + 1 for n in ids), default=0),
                "branching": round(sum(fan) / len(fan), 3) if fan else 0.0, "max_branching": max(fan, default=0),
                "goal_marked": bool(self.goals), "goal_id": self.goals[0] if self.goals else None,
                "dead_ends": self.dead_ends, "backtracks": self.backtracks, "orphans": orphans,
                "has_summary": self.has_summary, "skipped_lines": self.skipped_lines}


def parse_tree(text: str) -> Tree:
    """The tree written in an ATS response (BFS or DFS); tolerant of formatting noise, never raises."""
    tree = Tree()
    for raw in text.splitlines():
        line = _CLEAN.sub("", raw).strip()
        if not line or _LEVEL.match(line):
            continue
        if _SUMMARY.match(line):
            tree.has_summary = True
            continue
        if re.match(r"^\W*(?:final\s+)?answer\b", line, re.IGNORECASE):
            continue
        if _BACK.search(line) and not _NODE.match(line):
            tree.backtracks += 1
            continue
        m = _NODE.match(line)
        if not m:
            tree.skipped_lines += 1
            continue
        node_id = re.sub(r"\s+", "", m.group(1))
        body = m.group(2)
        if node_id not in tree.nodes:
            tree.nodes[node_id] = body
        if _GOAL.search(body) and node_id not in tree.goals:
            tree.goals.append(node_id)
        elif _DEAD.search(body):
            tree.dead_ends += 1
        if _BACK.search(body):
            tree.backtracks += 1
    return tree
