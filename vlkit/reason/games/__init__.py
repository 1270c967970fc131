"""The puzzle games of the ATS paper, plus the Game of 24: generators, exact solvers and verifiers."""

from __future__ import annotations

from vlkit.errors import VlkitError
from vlkit.reason.games.base import Game, Step, Verdict, extract_answer
from vlkit.reason.games.combine import Arithmetic, Game24
from vlkit.reason.games.grass import MinimalGrass
from vlkit.reason.games.numpath import NumberPath
from vlkit.reason.games.water import DropWater

GAMES: dict[str, Game] = {g.name: g for g in (DropWater(), NumberPath(), Arithmetic(), MinimalGrass(), Game24())}


def get_game(name: str) -> Game:
    if name not in GAMES:
        raise VlkitError(f"unknown game {name!r}; choose one of {sorted(GAMES)}")
    return GAMES[name]


__all__ = ["GAMES", "Game", "Step", "Verdict", "extract_answer", "get_game"]
