"""The Midjourney-style parameter line of a job: ``a red fox --ar 3:2 --seed 7 --stylize 250``.

Members wrote their prompt in this language, so the gallery shows it back the same way instead of
the engine's internals (bucket sizes, samplers, job kinds). Only parameters that differ from
their defaults are written, in Midjourney's usual order; unknown or malformed values are left out
rather than guessed at.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

# Values that are URLs (image prompts, references) would turn the line into a wall of links.
_URL_RE = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
MAX_VALUE_CHARS = 60


def _number(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        return None
    if not number.is_finite():
        return None
    return format(number.normalize(), "f")


def _word(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    text = " ".join(value.split())
    if not text or len(text) > MAX_VALUE_CHARS or _URL_RE.match(text) or "--" in text:
        return None
    return text


def _aspect(value: Any) -> str | None:
    if isinstance(value, list | tuple) and len(value) == 2:
        width, height = (_number(v) for v in value)
        if width and height and (width, height) != ("1", "1"):
            return f"{width}:{height}"
    return None


def _non_default(value: Any, default: str) -> str | None:
    text = _number(value)
    return None if text is None or text == default else text


def _profile(value: Any) -> str | None:
    text = _word(value)
    if text is None:
        return None
    if text.lower().startswith("niji"):
        version = text[4:].strip()
        return f"--niji {version}" if version else "--niji"
    return f"--v {text}"


def _codes(values: Any) -> str | None:
    if not isinstance(values, list | tuple):
        return None
    codes = [code for code in (_word(v) for v in values) if code]
    return " ".join(codes) if codes else None


def parameters(params: dict[str, Any], seed: int | None) -> list[str]:
    """The ``--name value`` parameters of a job, in Midjourney's order."""
    out: list[str] = []

    def add(flag: str, value: str | None) -> None:
        if value:
            out.append(f"{flag} {value}")

    add("--ar", _aspect(params.get("aspect")))
    profile = _profile(params.get("model_profile"))
    if profile:
        out.append(profile)
    add("--no", _word(params.get("negative_prompt")))
    add("--chaos", _non_default(params.get("chaos"), "0"))
    add("--stylize", _non_default(params.get("stylize"), "100"))
    add("--weird", _non_default(params.get("weird"), "0"))
    add("--q", _non_default(params.get("quality"), "1"))
    add("--stop", _non_default(params.get("stop"), "100"))
    add("--iw", _number(params.get("image_weight")))
    if params.get("raw") is True:
        out.append("--style raw")
    else:
        add("--style", _word(params.get("style")))
    add("--sref", _codes(params.get("style_refs")))
    add("--sw", _number(params.get("style_weight")))
    add(
        "--cw",
        _number(params.get("character_weight")),
    )
    add("--exp", _number(params.get("experimental")))
    if params.get("tile") is True:
        out.append("--tile")
    if params.get("draft") is True:
        out.append("--draft")
    if isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0:
        out.append(f"--seed {seed}")
    return out


def parameter_line(prompt: str, params: dict[str, Any], seed: int | None) -> str:
    """The prompt followed by its parameters, as a member would type it."""
    text = " ".join(prompt.split())
    return " ".join([text, *parameters(params, seed)]).strip()
