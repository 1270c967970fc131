"""Progress bars and console output shared by every command."""

from __future__ import annotations

import sys
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_on(flag: bool | None) -> bool:
    """Explicit True/False wins; None means: only when stderr is a terminal."""
    return sys.stderr.isatty() if flag is None else flag


def bar(iterable: Iterable[T] | None = None, *, desc: str, total: int | None = None,
        enabled: bool | None = None, **kw) -> tqdm:
    return tqdm(iterable, desc=desc, total=total, disable=not progress_on(enabled), leave=False,
                dynamic_ncols=True, mininterval=0.5, **kw)
