"""Safe arithmetic for answers written by models: a small recursive-descent parser over exact fractions.

Model text is never handed to `eval` (nor to `ast`): this parser accepts only non-negative integer
literals, the four operations (also written ×, ÷, x between operands, −) and parentheses, bounded in
length and nesting, and computes with `fractions.Fraction`, so 8/(3-8/3) is exactly 24.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

MAX_CHARS = 200
MAX_DEPTH = 32
_TOKEN = re.compile(r"\s*(?:(\d+)|(.))")
_SYNONYMS = str.maketrans({"×": "*", "÷": "/", "−": "-", "–": "-", "·": "*", "∗": "*", "[": "(", "]": ")",
                           "{": "(", "}": ")"})


class ArithError(ValueError):
    """Text that is not a well-formed expression, or one that divides by zero."""


@dataclass(frozen=True)
class Expression:
    value: Fraction
    numbers: tuple[int, ...]  # the literals, in the order written


def _tokens(text: str) -> list[str]:
    text = text.translate(_SYNONYMS)
    # "3 x 4" and "3x4": x between two operands means times
    text = re.sub(r"(?<=[\d)])\s*[xX]\s*(?=[\d(])", "*", text)
    out = []
    for number, other in _TOKEN.findall(text):
        if number:
            out.append(number)
        elif other.strip():
            if other not in "+-*/()":
                raise ArithError(f"unexpected character {other!r}")
            out.append(other)
    return out


def parse(text: str) -> Expression:
    """The exact value and the number literals of an arithmetic expression. Raises ArithError."""
    if len(text) > MAX_CHARS:
        raise ArithError(f"expression longer than {MAX_CHARS} characters")
    tokens = _tokens(text)
    if not tokens:
        raise ArithError("empty expression")
    pos = 0
    numbers: list[int] = []

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def expr(depth: int) -> Fraction:
        value = term(depth)
        while peek() in ("+", "-"):
            op, rhs = take(), term(depth)
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(depth: int) -> Fraction:
        value = factor(depth)
        while peek() in ("*", "/"):
            op, rhs = take(), factor(depth)
            if op == "*":
                value = value * rhs
            elif rhs == 0:
                raise ArithError("division by zero")
            else:
                value = value / rhs
        return value

    def factor(depth: int) -> Fraction:
        if depth > MAX_DEPTH:
            raise ArithError(f"parentheses nested deeper than {MAX_DEPTH}")
        tok = peek()
        if tok is None:
            raise ArithError("expression ends early")
        if tok == "(":
            take()
            value = expr(depth + 1)
            if peek() != ")":
                raise ArithError("unbalanced parentheses")
            take()
            return value
        if tok.isdigit():
            take()
            if len(tok) > 6:
                raise ArithError(f"number {tok[:8]}... is too long")
            numbers.append(int(tok))
            return Fraction(int(tok))
        raise ArithError(f"unexpected {tok!r}")

    value = expr(0)
    if pos != len(tokens):
        raise ArithError(f"unexpected {tokens[pos]!r} after the expression")
    return Expression(value, tuple(numbers))


def show(x: Fraction) -> str:
    """A fraction as a model would write it: 6, 8/3, -2."""
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"
