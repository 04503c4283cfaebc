"""Parse a Midjourney-style ``/imagine`` prompt into validated :class:`GenerationParams`.

Grammar (SPEC §2):

- Everything before the first parameter is the prompt text. A parameter is ``--name`` (also
  ``—name`` / ``–name``, because phones turn ``--`` into a dash) at the start of the text or after
  whitespace, with ``name`` starting with an ASCII letter. ``a cat—dog`` and ``-- 5`` are plain text.
  ``— ar`` (dash, space, name) is prose, not a parameter.
- A parameter's value runs until the next parameter, so ``--no red, blue --ar 3:2`` works.
  Text left after a flag or after a one-word value (``--tile a cat``, ``--ar 16:9 a cat``) is an
  error that tells the member to put the prompt first, rather than silently dropping words.
- Names are case-insensitive. Each parameter may appear once, except ``--no``, whose values merge.
- ``--ar`` is stored reduced (``32:18`` becomes ``(16, 9)``); width and height are the nearest SDXL
  bucket at 1024 base.
- Whitespace runs collapse to one space, control characters become spaces, and lone surrogates
  are dropped, so the prompt is always storable text.

:func:`parse_prompt` raises only :class:`PromptError`, whose ``str()`` is a sentence for the member.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from pydantic import ValidationError

from workers.schema import MAX_SEED, Engine, GenerationParams, Sampler, Visibility, nearest_bucket

MAX_PROMPT_LENGTH = 1500
MAX_NEGATIVE_LENGTH = 1500
MAX_ASPECT_RATIO = 4  # between 1:4 and 4:1, inclusive
QUALITY_VALUES: tuple[Decimal, ...] = (Decimal("0.25"), Decimal("0.5"), Decimal("1"), Decimal("2"))
_SHOWN_VALUE_LENGTH = 40  # echoing a whole pasted paragraph back would bury the actual problem

# A run of hyphens/dashes that marks a parameter: "--", "—", "–", "―" and mixtures like "—-".
_DASHES = "—–―"
_PARAM_RE = re.compile(
    rf"(?:^|(?<=\s))(?P<marker>--+|-*[{_DASHES}][-{_DASHES}]*)(?P<name>[A-Za-z]\S*)",
)
_INT_RE = re.compile(r"[0-9]+")
_DECIMAL_RE = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
_ASPECT_RE = re.compile(r"([0-9]+):([0-9]+)")
_MAX_INT_DIGITS = 12  # beyond every range here; keeps int() away from huge digit strings


class PromptError(ValueError):
    """A prompt the member has to fix. ``str()`` is a sentence fit for an ephemeral reply.

    ``parameter`` is the canonical parameter name (``"chaos"`` for ``--c``), the unknown name as
    typed, or ``"prompt"`` for problems with the prompt text itself. ``value`` is what the member
    wrote (``None`` when missing) and ``allowed`` describes what would have been accepted.
    """

    def __init__(self, message: str, *, parameter: str, value: str | None = None, allowed: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.parameter = parameter
        self.value = value
        self.allowed = allowed

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class _Spec:
    """How one parameter is validated and what it sets on GenerationParams."""

    name: str  # canonical name, PromptError.parameter
    label: str  # what messages call it: "<label> must be <allowed>"
    aliases: tuple[str, ...]
    allowed: str
    flag: bool = False
    convert: Callable[[str], Any] | None = None  # returns the value or raises _Invalid


class _Invalid(Exception):
    """Internal: a value could not be converted; ``out_of_range`` picks the wording."""

    def __init__(self, out_of_range: bool = False) -> None:
        super().__init__()
        self.out_of_range = out_of_range


def _whole(low: int, high: int) -> Callable[[str], int]:
    def convert(text: str) -> int:
        if not _INT_RE.fullmatch(text):
            raise _Invalid()
        digits = text.lstrip("0") or "0"
        if len(digits) > _MAX_INT_DIGITS:
            raise _Invalid(out_of_range=True)
        number = int(digits)
        if not low <= number <= high:
            raise _Invalid(out_of_range=True)
        return number

    return convert


def _aspect(text: str) -> tuple[int, int]:
    text = re.sub(r"\s*[:：∶]\s*", ":", text)
    match = _ASPECT_RE.fullmatch(text)
    if not match:
        raise _Invalid()
    sides = [part.lstrip("0") or "0" for part in match.groups()]
    if any(len(side) > _MAX_INT_DIGITS for side in sides):
        raise _Invalid(out_of_range=True)
    width, height = int(sides[0]), int(sides[1])
    if width == 0 or height == 0:
        raise _Invalid(out_of_range=True)
    if width > MAX_ASPECT_RATIO * height or height > MAX_ASPECT_RATIO * width:
        raise _Invalid(out_of_range=True)
    divisor = math.gcd(width, height)
    return width // divisor, height // divisor


def _quality(text: str) -> float:
    if not _DECIMAL_RE.fullmatch(text) or len(text) > 20:
        raise _Invalid()
    try:
        value = Decimal(text)
    except InvalidOperation:  # pragma: no cover - the regex admits only valid decimals
        raise _Invalid() from None
    if value not in QUALITY_VALUES:
        raise _Invalid(out_of_range=True)
    return float(value)


def _choice(options: dict[str, Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        key = text.lower().replace("-", "_")
        if key not in options:
            raise _Invalid(out_of_range=True)
        return options[key]

    return convert


_SAMPLERS = {sampler.value: sampler for sampler in Sampler}
_ENGINES = {"sdxl": Engine.SDXL, "openai": Engine.OPENAI, "dalle": Engine.OPENAI, "dall_e": Engine.OPENAI}

_SPECS: tuple[_Spec, ...] = (
    _Spec(
        "ar",
        "the aspect ratio",
        ("ar", "aspect"),
        "two whole numbers W:H between 1:4 and 4:1, e.g. 16:9",
        convert=_aspect,
    ),
    _Spec("seed", "the seed", ("seed",), f"a whole number from 0 to {MAX_SEED}", convert=_whole(0, MAX_SEED)),
    _Spec("no", "the negative prompt", ("no",), "the things to leave out, e.g. `--no text, watermark`"),
    _Spec("chaos", "chaos", ("chaos", "c"), "a whole number from 0 to 100", convert=_whole(0, 100)),
    _Spec("stylize", "stylize", ("stylize", "s"), "a whole number from 0 to 1000", convert=_whole(0, 1000)),
    _Spec("quality", "quality", ("quality", "q"), "one of .25, .5, 1 or 2", convert=_quality),
    _Spec("tile", "tile", ("tile",), "a flag without a value", flag=True),
    _Spec("steps", "steps", ("steps",), "a whole number from 1 to 150", convert=_whole(1, 150)),
    _Spec(
        "sampler", "the sampler", ("sampler",), "one of " + ", ".join(_SAMPLERS), convert=_choice(_SAMPLERS)
    ),
    _Spec("model", "the model", ("model",), "one of sdxl, dalle", convert=_choice(_ENGINES)),
    _Spec("stealth", "stealth", ("stealth",), "a flag without a value", flag=True),
    _Spec("public", "public", ("public",), "a flag without a value", flag=True),
)
_BY_ALIAS: dict[str, _Spec] = {alias: spec for spec in _SPECS for alias in spec.aliases}
KNOWN_PARAMETERS: tuple[str, ...] = tuple(f"--{alias}" for spec in _SPECS for alias in spec.aliases)


def _clean(text: str) -> str:
    """Control characters become spaces and surrogates vanish, so the text is storable anywhere."""
    out = []
    for char in text:
        category = unicodedata.category(char)
        if category == "Cs":
            continue
        out.append(" " if category == "Cc" else char)
    return "".join(out)


def _collapse(text: str) -> str:
    return " ".join(text.split())


def _show(text: str) -> str:
    """A value as it can sit inside Discord inline code: short and without backticks."""
    text = text.replace("`", "'")
    if len(text) > _SHOWN_VALUE_LENGTH:
        text = text[: _SHOWN_VALUE_LENGTH - 1] + "…"
    return text


def parse_prompt(text: str) -> GenerationParams:
    """Split ``text`` into the prompt and its parameters and validate every one of them.

    Raises :class:`PromptError` (and nothing else) for any input the member has to fix.
    """
    text = _clean(text)
    matches = list(_PARAM_RE.finditer(text))
    prompt = _collapse(text[: matches[0].start()] if matches else text)

    seen: dict[str, str] = {}  # canonical name -> name as typed, to spot duplicates
    negatives: list[str] = []
    values: dict[str, Any] = {}
    for index, match in enumerate(matches):
        typed = match.group("name")
        end = matches[index + 1].start() if index + 1 < len(matches) else len(text)
        raw = _collapse(text[match.end() : end])
        spec = _BY_ALIAS.get(typed.lower())
        if spec is None:
            raise PromptError(
                f"`--{_show(typed)}` is not a known parameter. Known parameters: "
                + ", ".join(KNOWN_PARAMETERS)
                + ".",
                parameter=typed,
                value=raw or None,
                allowed=", ".join(KNOWN_PARAMETERS),
            )
        shown = f"--{typed.lower()}"
        if spec.name == "no":
            if not raw:
                raise PromptError(
                    f"`{shown}` needs a value: list {spec.allowed}.",
                    parameter=spec.name,
                    allowed=spec.allowed,
                )
            negatives.append(raw)
            continue
        if spec.name in seen:
            first = f"--{seen[spec.name].lower()}"
            repeats = "is given more than once" if first == shown else f"repeats `{first}`"
            raise PromptError(
                f"`{shown}` {repeats}; use it once.",
                parameter=spec.name,
                value=raw or None,
                allowed=spec.allowed,
            )
        seen[spec.name] = typed
        if spec.flag:
            if raw:
                raise PromptError(
                    f"`{shown}` takes no value, but `{_show(raw)}` follows it. "
                    "Put the prompt text before the parameters.",
                    parameter=spec.name,
                    value=raw,
                    allowed=spec.allowed,
                )
            values[spec.name] = True
            continue
        values[spec.name] = _convert(spec, shown, raw)

    _check_prompt(prompt)
    negative = ", ".join(negatives)
    if len(negative) > MAX_NEGATIVE_LENGTH:
        raise PromptError(
            f"The `--no` list is {len(negative)} characters long; the limit is {MAX_NEGATIVE_LENGTH}.",
            parameter="no",
            value=_show(negative),
            allowed=f"at most {MAX_NEGATIVE_LENGTH} characters",
        )
    if values.get("stealth") and values.get("public"):
        raise PromptError(
            "`--stealth` and `--public` contradict each other; use one of them.",
            parameter="stealth",
            value="--public",
            allowed="either --stealth or --public",
        )
    return _build(prompt, negative, values)


def _convert(spec: _Spec, shown: str, raw: str) -> Any:
    assert spec.convert is not None
    if not raw:
        raise PromptError(
            f"`{shown}` needs a value: {spec.label} must be {spec.allowed}.",
            parameter=spec.name,
            allowed=spec.allowed,
        )
    # Aspect ratios are allowed spaces around the colon; everything else is a single word.
    words = re.sub(r"\s*[:：∶]\s*", ":", raw).split() if spec.name == "ar" else raw.split()
    if len(words) > 1:
        raise PromptError(
            f"`{shown} {_show(raw)}` has more than one value: {spec.label} must be {spec.allowed}. "
            "Put the prompt text before the parameters.",
            parameter=spec.name,
            value=raw,
            allowed=spec.allowed,
        )
    try:
        return spec.convert(words[0])
    except _Invalid as exc:
        problem = "is out of range" if exc.out_of_range else "is not valid"
        raise PromptError(
            f"`{shown} {_show(raw)}` {problem}: {spec.label} must be {spec.allowed}.",
            parameter=spec.name,
            value=raw,
            allowed=spec.allowed,
        ) from None


def _check_prompt(prompt: str) -> None:
    if not prompt:
        raise PromptError(
            "The prompt is empty: describe the image first, then add parameters, "
            "e.g. `a red fox in the snow --ar 3:2`.",
            parameter="prompt",
            allowed="some text before the parameters",
        )
    if len(prompt) > MAX_PROMPT_LENGTH:
        raise PromptError(
            f"The prompt is {len(prompt)} characters long; the limit is {MAX_PROMPT_LENGTH}.",
            parameter="prompt",
            value=_show(prompt),
            allowed=f"at most {MAX_PROMPT_LENGTH} characters",
        )


def _build(prompt: str, negative: str, values: dict[str, Any]) -> GenerationParams:
    fields: dict[str, Any] = {"prompt": prompt, "negative_prompt": negative}
    if "ar" in values:
        aspect: tuple[int, int] = values["ar"]
        fields["aspect"] = aspect
        fields["width"], fields["height"] = nearest_bucket(*aspect)
    for name in ("seed", "chaos", "stylize", "quality", "steps", "sampler"):
        if name in values:
            fields[name] = values[name]
    if "model" in values:
        fields["engine"] = values["model"]
    fields["tile"] = bool(values.get("tile"))
    if values.get("stealth"):
        fields["visibility"] = Visibility.STEALTH
    elif values.get("public"):
        fields["visibility"] = Visibility.PUBLIC
    try:
        return GenerationParams(**fields)
    except ValidationError as exc:  # pragma: no cover - every field is range-checked above
        raise PromptError(
            "These parameters cannot be combined.", parameter="prompt", allowed=str(exc)
        ) from None
