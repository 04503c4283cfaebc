"""The one error type every prompt problem becomes, shared by the parser's modules."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MAX_MESSAGE_LENGTH = 1900  # under Discord's 2000-character limit
_SHOWN_VALUE_LENGTH = 40  # echoing a whole pasted paragraph back would bury the actual problem


@dataclass(frozen=True)
class PromptProblem:
    """One thing wrong with a prompt.

    ``parameter`` is the canonical parameter name (``"chaos"`` for ``--c``), an unknown name as
    typed, or ``"prompt"`` for the prompt text itself. ``value`` is what the member wrote
    (``None`` when missing) and ``allowed`` describes what would have been accepted.
    """

    message: str
    parameter: str
    value: str | None = None
    allowed: str = ""


class PromptError(ValueError):
    """A prompt the member has to fix. ``str()`` is the whole member-facing message.

    ``problems`` lists every individual problem; ``parameter``, ``value`` and ``allowed`` are
    the first one's, for callers that only look at one.
    """

    def __init__(
        self,
        message: str | Sequence[PromptProblem],
        *,
        parameter: str = "prompt",
        value: str | None = None,
        allowed: str = "",
    ) -> None:
        if isinstance(message, str):
            problems: tuple[PromptProblem, ...] = (PromptProblem(message, parameter, value, allowed),)
        else:
            problems = tuple(message)
            if not problems:
                raise ValueError("a PromptError needs at least one problem")
        self.problems = problems
        self.message = _combine(problems)
        super().__init__(self.message)
        first = problems[0]
        self.parameter = first.parameter
        self.value = first.value
        self.allowed = first.allowed

    def __str__(self) -> str:
        return self.message


def _combine(problems: Sequence[PromptProblem]) -> str:
    if len(problems) == 1:
        return problems[0].message
    lines = [f"This prompt has {len(problems)} problems:"]
    length = len(lines[0])
    for index, problem in enumerate(problems):
        line = f"- {problem.message}"
        # Discord refuses messages over 2000 characters; the first problems matter most.
        if length + len(line) + 40 > MAX_MESSAGE_LENGTH:
            lines.append(f"- …and {len(problems) - index} more.")
            break
        lines.append(line)
        length += len(line) + 1
    return "\n".join(lines)


def show(text: str) -> str:
    """A value as it can sit inside Discord inline code: short and without backticks."""
    text = text.replace("`", "'")
    if len(text) > _SHOWN_VALUE_LENGTH:
        text = text[: _SHOWN_VALUE_LENGTH - 1] + "…"
    return text
