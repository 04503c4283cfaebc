"""Midjourney multi-prompts (``hot dog::1.5 bun::-.5``) and ``(word:1.3)`` emphasis.

``::`` ends a part; a number right after it is the part's weight (1 when missing). Weights are
relative, so ``a::2 b::1`` equals ``a::4 b::2``: they are normalised so the positive weights sum
to 1, and negative-weight parts go to the negative side with the same scale. All weights together
must add up to more than zero, as on Midjourney.

Inside a part, ``(words:1.3)`` (the Automatic1111 convention many SDXL users write) gives those
tokens a weight of their own; the parentheses and number leave the text.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from bot.prompt_errors import PromptProblem, show
from workers.schema import PromptPart

MAX_PART_WEIGHT = 1000  # relative weights beyond this say nothing more, and keep numbers sane
MIN_EMPHASIS, MAX_EMPHASIS = 0.0, 3.0

_NUMBER = r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_SEPARATOR = re.compile(rf"::({_NUMBER})?")
_EMPHASIS = re.compile(rf"\(([^()]*?):\s*({_NUMBER})\s*\)")
_LINK = re.compile(r"https?://\S+", re.IGNORECASE)


def _separators(text: str) -> list[re.Match[str]]:
    # A link's "::" (an IPv6 host, a path) belongs to the link: split there, "::0" would drop text.
    links = [match.span() for match in _LINK.finditer(text)]
    return [
        match
        for match in _SEPARATOR.finditer(text)
        if not any(start <= match.start() < end for start, end in links)
    ]


def has_multiprompt_syntax(text: str) -> bool:
    """Whether ``text`` uses ``::`` weights or ``(word:1.3)`` emphasis."""
    return bool(_separators(text)) or _EMPHASIS.search(text) is not None


def split_emphasis(text: str, problems: list[PromptProblem]) -> tuple[str, tuple[tuple[str, float], ...]]:
    """``text`` without emphasis syntax, and its pieces with their weights (``()`` when none).

    Bad emphasis weights are appended to ``problems``.
    """
    pieces: list[tuple[str, float]] = []
    position = 0
    for match in _EMPHASIS.finditer(text):
        weight = float(match.group(2))
        if not MIN_EMPHASIS <= weight <= MAX_EMPHASIS:
            problems.append(
                PromptProblem(
                    f"The emphasis `({show(match.group(1))}:{match.group(2)})` is out of range: "
                    f"the weight must be from {MIN_EMPHASIS:g} to {MAX_EMPHASIS:g}.",
                    parameter="prompt",
                    value=match.group(0),
                    allowed=f"a number from {MIN_EMPHASIS:g} to {MAX_EMPHASIS:g}",
                )
            )
        if match.start() > position:
            pieces.append((text[position : match.start()], 1.0))
        pieces.append((match.group(1), weight))
        position = match.end()
    if not pieces:
        return text, ()
    if position < len(text):
        pieces.append((text[position:], 1.0))
    return "".join(piece for piece, _ in pieces), tuple(pieces)


def _weight(text: str | None, problems: list[PromptProblem]) -> Decimal:
    if text is None:
        return Decimal(1)
    try:
        weight = Decimal(text)
    except InvalidOperation:  # pragma: no cover - the pattern admits only valid decimals
        weight = Decimal(1)
    if abs(weight) > MAX_PART_WEIGHT:
        problems.append(
            PromptProblem(
                f"The multi-prompt weight `::{show(text)}` is out of range: "
                f"weights must be from -{MAX_PART_WEIGHT} to {MAX_PART_WEIGHT}.",
                parameter="prompt",
                value=text,
                allowed=f"a number from -{MAX_PART_WEIGHT} to {MAX_PART_WEIGHT}",
            )
        )
        return Decimal(0)
    return weight


def split_multiprompt(text: str, problems: list[PromptProblem]) -> tuple[PromptPart, ...]:
    """The weighted parts of ``text``, normalised; ``()`` when it uses no multi-prompt syntax.

    Problems (bad weights, weights that do not add up to more than zero) are appended to
    ``problems``; the parts returned then are only a best effort.
    """
    if not has_multiprompt_syntax(text):
        return ()
    raw: list[tuple[str, Decimal]] = []
    position = 0
    for match in _separators(text):
        raw.append((text[position : match.start()], _weight(match.group(1), problems)))
        position = match.end()
    raw.append((text[position:], Decimal(1)))
    kept = [(" ".join(part.split()).strip(" ,"), weight) for part, weight in raw]
    kept = [(part, weight) for part, weight in kept if part and weight != 0]
    total = sum((weight for _, weight in kept if weight > 0), Decimal(0))
    if total <= 0 or sum((weight for _, weight in kept), Decimal(0)) <= 0:
        problems.append(
            PromptProblem(
                "The multi-prompt weights must add up to more than 0, e.g. `castle::2 fog::-.5`.",
                parameter="prompt",
                value=show(text),
                allowed="positive weights that outweigh the negative ones",
            )
        )
        return ()
    parts = []
    for part, weight in kept:
        clean, emphasis = split_emphasis(part, problems)
        parts.append(PromptPart(text=clean, weight=float(weight / total), emphasis=emphasis))
    return tuple(parts)
