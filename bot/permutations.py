"""Midjourney's permutation prompts: ``a {red, blue} car --ar {1:1, 16:9}`` makes four prompts.

Braces may sit anywhere, parameters included, and may nest (``{a {big, small} dog, a cat}``).
``\\,``, ``\\{``, ``\\}`` and ``\\\\`` stand for the character itself. Each option is trimmed, so
``{a, b}`` and ``{a,b}`` mean the same. Expansion happens before parsing, so every prompt that
comes out is parsed on its own.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Union

from bot.prompt_errors import PromptError, PromptProblem

MAX_PROMPTS = 40  # Midjourney's own ceiling for one command
MAX_DEPTH = 8  # deeper nesting is never meant, and recursion must stay bounded

_ESCAPABLE = ",{}\\"

# A sequence is literal text and alternatives in order; an alternative is a list of sequences.
_Item = Union[str, "list[_Sequence]"]
_Sequence = list[_Item]


class _Unbalanced(Exception):
    def __init__(self, problem: PromptProblem) -> None:
        super().__init__(problem.message)
        self.problem = problem


def _parse(text: str) -> _Sequence:
    """Parse ``text`` into a tree of literal text and alternatives."""
    position = 0

    def sequence(depth: int) -> _Sequence:
        nonlocal position
        items: _Sequence = []
        literal: list[str] = []
        while position < len(text):
            char = text[position]
            if char == "\\" and position + 1 < len(text) and text[position + 1] in _ESCAPABLE:
                literal.append(text[position + 1])
                position += 2
                continue
            if char == "{":
                if depth >= MAX_DEPTH:
                    raise _Unbalanced(
                        PromptProblem(
                            f"Permutations nest more than {MAX_DEPTH} levels deep.",
                            parameter="prompt",
                            allowed=f"at most {MAX_DEPTH} levels of `{{…}}`",
                        )
                    )
                items.append("".join(literal))
                literal = []
                position += 1
                items.append(alternatives(depth + 1))
                continue
            if depth > 0 and char in ",}":
                break
            if char == "}":
                raise _Unbalanced(
                    PromptProblem(
                        "There is a `}` without a matching `{`. Write `\\}` for a literal brace.",
                        parameter="prompt",
                        value="}",
                        allowed="permutations like `{red, blue}`",
                    )
                )
            literal.append(char)
            position += 1
        items.append("".join(literal))
        return items

    def alternatives(depth: int) -> list[_Sequence]:
        nonlocal position
        options = [sequence(depth)]
        while position < len(text) and text[position] == ",":
            position += 1
            options.append(sequence(depth))
        if position >= len(text):
            raise _Unbalanced(
                PromptProblem(
                    "A `{` is never closed with `}`. Write `\\{` for a literal brace.",
                    parameter="prompt",
                    value="{",
                    allowed="permutations like `{red, blue}`",
                )
            )
        position += 1  # the closing brace
        return options

    return sequence(0)


def _count(items: _Sequence) -> int:
    total = 1
    for item in items:
        if isinstance(item, list):
            total *= sum(_count(option) for option in item)
    return total


def _expand(items: _Sequence) -> Iterator[str]:
    choices: list[list[str]] = []
    for item in items:
        if isinstance(item, str):
            choices.append([item])
        else:
            choices.append([text.strip() for option in item for text in _expand(option)])
    for combination in itertools.product(*choices):
        yield "".join(combination)


def count_permutations(text: str) -> int:
    """How many prompts ``text`` expands to. Raises :class:`PromptError` for unbalanced braces."""
    try:
        return _count(_parse(text))
    except _Unbalanced as exc:
        raise PromptError([exc.problem]) from None


def expand_permutations(text: str, limit: int = MAX_PROMPTS) -> list[str]:
    """Every prompt ``text`` stands for, in order (one, unchanged but unescaped, without braces).

    Raises :class:`PromptError` for unbalanced braces, or when there would be more than
    ``limit`` prompts (the message names the count).
    """
    try:
        tree = _parse(text)
    except _Unbalanced as exc:
        raise PromptError([exc.problem]) from None
    count = _count(tree)
    if count > limit:
        # A few dozen braces already make a number too long to read (or to fit in a reply).
        shown = str(count) if count < 1_000_000 else "more than a million"
        raise PromptError(
            f"This prompt's permutations make {shown} prompts; the limit is {limit}.",
            parameter="prompt",
            value=shown,
            allowed=f"at most {limit} prompts",
        )
    return list(_expand(tree))
