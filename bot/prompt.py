"""Parse a Midjourney-style ``/imagine`` prompt into validated :class:`GenerationParams`.

Grammar:

- The text is normalised first: NFKC, zero-width and bidi control characters removed, control
  characters turned into spaces, lone surrogates dropped, so an invisible character can never
  turn ``--ar`` into prose and the prompt is always storable text.
- ``{a, b}`` permutations are expanded before anything else (:mod:`bot.permutations`); every
  prompt that comes out is parsed on its own, and ``--repeat N`` repeats it N times.
- Image URLs at the very start (``https://…`` or ``<https://…>``), at most ten, are image prompts.
- Everything up to the first parameter is the prompt text, with ``::`` multi-prompt weights and
  ``(word:1.3)`` emphasis (:mod:`bot.multiprompt`). A parameter is ``--name`` (also ``—name`` /
  ``–name``, because phones turn ``--`` into a dash) at the start or after whitespace, with
  ``name`` starting with an ASCII letter. ``a cat—dog`` and ``-- 5`` are plain text, but a
  glued ``a cat--ar 16:9`` that would parse as a parameter is an error (it is never meant as
  prose), as is a bare ``--`` ending a prompt after its parameters.
- A parameter's value runs until the next parameter, so ``--no red, blue --ar 3:2`` works.
  Text left after a flag or a one-word value (``--tile a cat``) is an error that tells the
  member to put the prompt first, rather than silently dropping words.
- Names are case-insensitive. Each parameter may appear once, except ``--no``, whose values merge.
- Every problem is collected and reported in one :class:`PromptError`; parameters Mirage cannot
  honour but Midjourney has (``--exp``, ``--p``, ``--sv``, …) are accepted with a note.

:func:`plan_prompts` is what a command calls; :func:`parse_prompt` is the one-prompt shortcut.
"""

from __future__ import annotations

import difflib
import math
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from pydantic import ValidationError

from bot.multiprompt import split_multiprompt
from bot.permutations import MAX_PROMPTS, expand_permutations
from bot.prompt_errors import PromptError, PromptProblem, show
from bot.styles import RAW, StylePreset, shipped_presets
from workers.schema import (
    MAX_SEED,
    Engine,
    GenerationParams,
    Sampler,
    Visibility,
    nearest_bucket,
)

__all__ = [
    "KNOWN_PARAMETERS",
    "MAX_JOBS",
    "MAX_NEGATIVE_LENGTH",
    "MAX_PROMPT_LENGTH",
    "ParsedPrompt",
    "PromptError",
    "PromptPlan",
    "PromptProblem",
    "analyse_prompt",
    "normalise_text",
    "parameter_line",
    "parse_prompt",
    "plan_prompts",
    "prompt_text",
]

MAX_PROMPT_LENGTH = 1500
MAX_NEGATIVE_LENGTH = 1500
MAX_ASPECT_RATIO = 4  # SDXL's buckets end at 4:1 and 1:4; wider requests get the widest one
MAX_JOBS = MAX_PROMPTS  # permutations times --repeat
QUALITY_VALUES: tuple[Decimal, ...] = tuple(Decimal(v) for v in ("0.25", "0.5", "1", "2", "4"))
VERSION_VALUES: tuple[str, ...] = ("1", "2", "3", "4", "5", "5.1", "5.2", "6", "6.1", "7")
NIJI_VALUES: tuple[str, ...] = ("5", "6")
DEFAULT_NIJI = "6"
MAX_REFERENCES = 10

# A run of hyphens/dashes that marks a parameter: "--", "—", "–", "―" and mixtures like "—-".
_DASHES = "—–―"
PARAMETER_MARKER = rf"--+|-*[{_DASHES}][-{_DASHES}]*"
_PARAM_RE = re.compile(rf"(?:^|(?<=\s))(?P<marker>{PARAMETER_MARKER})(?P<name>[A-Za-z]\S*)")
# The same marker glued to the word before it (``cat--ar``): prose by the grammar, checked anyway.
_GLUED_RE = re.compile(rf"(?<=[^\s{_DASHES}-])(?P<marker>{PARAMETER_MARKER})(?P<name>[A-Za-z]\S*)")
# A marker with no name, ending the text: a parameter begun and never finished.
_TRAILING_RE = re.compile(rf"(?:^|(?<=\s))(?:{PARAMETER_MARKER})\s*$")
_INT_RE = re.compile(r"[0-9]+")
_DECIMAL_RE = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
_ASPECT_RE = re.compile(r"([0-9]+):([0-9]+)")
_ASPECT_TYPO_RE = re.compile(r"([0-9]+)\s*[/xX×*,;.\- ]\s*([0-9]+)")
_URL_RE = re.compile(r"<?(https?://[^\s<>]+)>?", re.IGNORECASE)
_CODE_RE = re.compile(r"[A-Za-z0-9_-]{1,40}")
_COLONS_RE = re.compile(r"\s*[:∶]\s*")
_MAX_INT_DIGITS = 12  # beyond every range here; keeps int() away from huge digit strings

# Zero-width and bidi controls: invisible, and able to glue "--ar" to the word before it.
_INVISIBLE = frozenset(
    "\u00ad\u061c\u180e\u200b\u200c\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
    "\u2060\u2061\u2062\u2063\u2064\u2066\u2067\u2068\u2069\ufeff"
)
_ZWJ = "\u200d"  # kept between two non-ASCII characters: it builds emoji sequences


class _Invalid(Exception):
    """Internal: a value could not be converted; ``out_of_range`` picks the wording."""

    def __init__(self, out_of_range: bool = False, suggestion: str = "") -> None:
        super().__init__()
        self.out_of_range = out_of_range
        self.suggestion = suggestion


# How a parameter takes its value.
FLAG, VALUE, OPTIONAL, WORDS, OPTIONAL_WORDS, TEXT = "flag", "value", "optional", "words", "opt-words", "text"


@dataclass(frozen=True)
class _Spec:
    """How one parameter is validated."""

    name: str  # canonical name, PromptProblem.parameter
    label: str  # what messages call it: "<label> must be <allowed>"
    aliases: tuple[str, ...]
    allowed: str
    kind: str = VALUE
    convert: Callable[[str], Any] | None = None  # one word -> value, or raises _Invalid
    note: str = ""  # said whenever the parameter is used: what Mirage does instead


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


def _decimal(text: str) -> Decimal:
    if not _DECIMAL_RE.fullmatch(text) or len(text) > 20:
        raise _Invalid()
    try:
        return Decimal(text)
    except InvalidOperation:  # pragma: no cover - the regex admits only valid decimals
        raise _Invalid() from None


def _canonical_decimal(value: Decimal) -> str:
    text = format(value.normalize(), "f")
    return text[:-2] if text.endswith(".0") else text


def _aspect(text: str) -> tuple[int, int]:
    match = _ASPECT_RE.fullmatch(_COLONS_RE.sub(":", text))
    if not match:
        typo = _ASPECT_TYPO_RE.fullmatch(text)
        raise _Invalid(suggestion=f"--ar {typo.group(1)}:{typo.group(2)}" if typo else "")
    sides = [part.lstrip("0") or "0" for part in match.groups()]
    if any(len(side) > _MAX_INT_DIGITS for side in sides):
        raise _Invalid(out_of_range=True)
    width, height = int(sides[0]), int(sides[1])
    if width == 0 or height == 0:
        raise _Invalid(out_of_range=True)
    divisor = math.gcd(width, height)
    return width // divisor, height // divisor


def _quality(text: str) -> float:
    value = _decimal(text)
    if value not in QUALITY_VALUES:
        raise _Invalid(out_of_range=True)
    return float(value)


def _version(text: str) -> str:
    value = _canonical_decimal(_decimal(text))
    if value not in VERSION_VALUES:
        raise _Invalid(out_of_range=True)
    return value


def _niji(text: str) -> str:
    value = _canonical_decimal(_decimal(text))
    if value not in NIJI_VALUES:
        raise _Invalid(out_of_range=True)
    return value


def _image_weight(text: str) -> float:
    value = _decimal(text)
    if not 0 <= value <= 3:
        raise _Invalid(out_of_range=True)
    return float(value)


def _url(text: str) -> str:
    match = _URL_RE.fullmatch(text)
    if not match:
        raise _Invalid()
    return match.group(1)


def split_reference(text: str) -> tuple[str, str]:
    """A ``--sref`` reference and its ``::2`` weight ("" without one): ``url::2`` -> ``(url, "2")``."""
    reference, _, weight = text.partition("::")
    return reference, weight


def _style_reference(text: str) -> str:
    # "url::2" weighs one reference against the others; the weight stays with the reference.
    reference, weight = split_reference(text)
    if weight and not _DECIMAL_RE.fullmatch(weight.removeprefix("-")):
        raise _Invalid()
    if reference.lower() == "random":
        return "random" + (f"::{weight}" if weight else "")
    if _INT_RE.fullmatch(reference) and len(reference) <= 20:
        return text
    return _url(reference) + (f"::{weight}" if weight else "")


def _code(text: str) -> str:
    if not _CODE_RE.fullmatch(text):
        raise _Invalid()
    return text


def _choice(options: dict[str, Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        key = text.lower().replace("-", "_")
        if key not in options:
            raise _Invalid(out_of_range=True)
        return options[key]

    return convert


_SAMPLERS = {sampler.value: sampler for sampler in Sampler}
_ENGINES = {
    "sdxl": Engine.SDXL,
    "openai": Engine.OPENAI,
    "dalle": Engine.OPENAI,
    "dall_e": Engine.OPENAI,
    "gpt_image": Engine.OPENAI,
    "gpt_image_1": Engine.OPENAI,
}
_NO_EFFECT = "has no equivalent on Mirage's engines and is ignored"

_SPECS: tuple[_Spec, ...] = (
    _Spec(
        "ar",
        "the aspect ratio",
        ("ar", "aspect"),
        "two whole numbers W:H above 0, e.g. 16:9 (beyond 4:1 or 1:4 the widest size is used)",
        convert=_aspect,
    ),
    _Spec("chaos", "chaos", ("chaos", "c"), "a whole number from 0 to 100", convert=_whole(0, 100)),
    _Spec("no", "the negative prompt", ("no",), "the things to leave out, e.g. `--no text, watermark`", TEXT),
    _Spec("quality", "quality", ("quality", "q"), "one of .25, .5, 1, 2 or 4", convert=_quality),
    _Spec("seed", "the seed", ("seed",), f"a whole number from 0 to {MAX_SEED}", convert=_whole(0, MAX_SEED)),
    _Spec("stop", "stop", ("stop",), "a whole number from 10 to 100", convert=_whole(10, 100)),
    _Spec("style", "the style", ("style",), "raw or a style preset name"),  # checked against the presets
    _Spec("raw", "raw", ("raw",), "a flag without a value", FLAG),
    _Spec("stylize", "stylize", ("stylize", "s"), "a whole number from 0 to 1000", convert=_whole(0, 1000)),
    _Spec("tile", "tile", ("tile",), "a flag without a value", FLAG),
    _Spec("weird", "weird", ("weird", "w"), "a whole number from 0 to 3000", convert=_whole(0, 3000)),
    _Spec("iw", "the image weight", ("iw",), "a number from 0 to 3, e.g. 1.5", convert=_image_weight),
    _Spec("niji", "niji", ("niji",), "nothing, 5 or 6", OPTIONAL, convert=_niji),
    _Spec(
        "version", "the version", ("v", "version"), "one of " + ", ".join(VERSION_VALUES), convert=_version
    ),
    _Spec(
        "repeat",
        "repeat",
        ("repeat", "r"),
        f"a whole number from 1 to {MAX_JOBS}",
        convert=_whole(1, MAX_JOBS),
    ),
    _Spec("fast", "fast", ("fast",), "a flag without a value", FLAG),
    _Spec("relax", "relax", ("relax",), "a flag without a value", FLAG),
    _Spec("turbo", "turbo", ("turbo",), "a flag without a value", FLAG),
    _Spec("draft", "draft", ("draft",), "a flag without a value", FLAG),
    _Spec("exp", "exp", ("exp",), "a whole number from 0 to 100", convert=_whole(0, 100), note=_NO_EFFECT),
    _Spec(
        "sref",
        "the style reference",
        ("sref",),
        "image URLs, style codes (numbers) or random",
        WORDS,
        convert=_style_reference,
    ),
    _Spec("sw", "the style weight", ("sw",), "a whole number from 0 to 1000", convert=_whole(0, 1000)),
    _Spec(
        "sv",
        "the style version",
        ("sv",),
        "a whole number from 1 to 6",
        convert=_whole(1, 6),
        note=_NO_EFFECT,
    ),
    _Spec("cref", "the character reference", ("cref",), "image URLs", WORDS, convert=_url),
    _Spec("cw", "the character weight", ("cw",), "a whole number from 0 to 100", convert=_whole(0, 100)),
    _Spec("oref", "the omni reference", ("oref",), "one image URL", convert=_url),
    _Spec("ow", "the omni weight", ("ow",), "a whole number from 1 to 1000", convert=_whole(1, 1000)),
    _Spec(
        "p",
        "personalization",
        ("p", "profile", "personalize"),
        "nothing or profile codes",
        OPTIONAL_WORDS,
        convert=_code,
        note=_NO_EFFECT,
    ),
    _Spec("steps", "steps", ("steps",), "a whole number from 1 to 150", convert=_whole(1, 150)),
    _Spec(
        "sampler", "the sampler", ("sampler",), "one of " + ", ".join(_SAMPLERS), convert=_choice(_SAMPLERS)
    ),
    _Spec(
        "model",
        "the model",
        ("model",),
        "one of sdxl, openai (also written dalle, dall-e or gpt-image)",
        convert=_choice(_ENGINES),
    ),
    _Spec("stealth", "stealth", ("stealth",), "a flag without a value", FLAG),
    _Spec("public", "public", ("public",), "a flag without a value", FLAG),
)
_BY_ALIAS: dict[str, _Spec] = {alias: spec for spec in _SPECS for alias in spec.aliases}
KNOWN_PARAMETERS: tuple[str, ...] = tuple(f"--{alias}" for spec in _SPECS for alias in spec.aliases)
_PRIMARY = ", ".join(f"--{spec.aliases[0]}" for spec in _SPECS)


def canonical_parameter(name: str) -> str:
    """The parameter a name or alias stands for (``aspect`` and ``ar``: ``ar``), lowercased."""
    lowered = name.lower()
    spec = _BY_ALIAS.get(lowered)
    return spec.name if spec is not None else lowered


VIDEO_PARAMETERS = frozenset({"video", "motion", "loop", "end", "bs"})
LEGACY_PARAMETERS = frozenset({"hd", "test", "testp", "creative", "uplight", "upbeta", "upanime"})
# Names that are also everyday words are left alone after a spaced "-- "; these never are.
_DISTINCTIVE = frozenset(
    {"ar", "stylize", "chaos", "iw", "niji", "sref", "sw", "sv", "cref", "cw", "oref", "ow", "sampler"}
)
_SPACED_RE = re.compile(
    rf"(?:^|(?<=\s))(--+|[{_DASHES}])\s+({'|'.join(sorted(_DISTINCTIVE))})(?=\s|$)", re.IGNORECASE
)


@dataclass(frozen=True)
class ParsedPrompt:
    """One parsed prompt: its parameters, the notes for the member, and how often to run it."""

    params: GenerationParams
    notes: tuple[str, ...] = ()
    repeat: int = 1


@dataclass(frozen=True)
class PromptPlan:
    """Every job one ``/imagine`` text asks for, in order, with the notes for the member."""

    params: list[GenerationParams]
    notes: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        """How many jobs (grids) the text makes."""
        return len(self.params)

    @property
    def needs_confirmation(self) -> bool:
        """More than one job: Midjourney asks before spending several jobs' worth of credits."""
        return self.count > 1


def normalise_text(text: str) -> str:
    """NFKC, without invisible or control characters: what every other step works on."""
    text = "".join(char for char in text if unicodedata.category(char) != "Cs")
    text = unicodedata.normalize("NFKC", text)
    out: list[str] = []
    for index, char in enumerate(text):
        if char in _INVISIBLE:
            # Removed, unless it is all that separates a word from a parameter's dashes.
            following = text[index + 1] if index + 1 < len(text) else ""
            if following and following in "-" + _DASHES:
                out.append(" ")
            continue
        if char == _ZWJ:
            before = text[index - 1] if index else " "
            after = text[index + 1] if index + 1 < len(text) else " "
            if before.isascii() or after.isascii():
                continue
        out.append(" " if unicodedata.category(char) == "Cc" else char)
    return "".join(out)


def _collapse(text: str) -> str:
    return " ".join(text.split())


def _suggest_name(typed: str) -> str:
    """The parameter a mistyped name most likely meant, as ``--name [value]``, or ``""``."""
    lowered = typed.lower()
    for alias in sorted(_BY_ALIAS, key=len, reverse=True):
        rest = lowered[len(alias) :]
        # "--ar16:9", "--v6.1", and "--seed=5" from command-line habits.
        if lowered.startswith(alias) and rest[:1] in set("0123456789.:="):
            return f"--{alias} {typed[len(alias) :].lstrip(':=')}"
    close = difflib.get_close_matches(lowered, _BY_ALIAS, n=1, cutoff=0.75)
    return f"--{close[0]}" if close else ""


class _Parser:
    """One prompt's parse: collects values, problems and notes instead of stopping at the first."""

    def __init__(self, styles: Mapping[str, StylePreset]) -> None:
        self.styles = styles
        self.problems: list[PromptProblem] = []
        self.notes: list[str] = []
        self.values: dict[str, Any] = {}
        self.seen: dict[str, str] = {}  # canonical name -> name as typed, to spot duplicates
        self.negatives: list[str] = []

    def problem(self, message: str, parameter: str, value: str | None = None, allowed: str = "") -> None:
        self.problems.append(PromptProblem(message, parameter, value, allowed))

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def parameter(self, typed: str, raw: str) -> None:
        name = typed.lower()
        spec = _BY_ALIAS.get(name)
        if spec is None:
            self.unknown(typed, raw)
            return
        shown = f"--{name}"
        if spec.kind == TEXT:
            if raw:
                self.negatives.append(raw)
            else:
                self.problem(f"`{shown}` needs a value: list {spec.allowed}.", spec.name, None, spec.allowed)
            return
        if spec.name in self.seen:
            first = f"--{self.seen[spec.name].lower()}"
            repeats = "is given more than once" if first == shown else f"repeats `{first}`"
            self.problem(f"`{shown}` {repeats}; use it once.", spec.name, raw or None, spec.allowed)
            return
        self.seen[spec.name] = typed
        if spec.note:
            self.note(f"`{shown}` {spec.note}.")
        if spec.kind == FLAG:
            if raw:
                self.problem(
                    f"`{shown}` takes no value, but `{show(raw)}` follows it. "
                    "Put the prompt text before the parameters.",
                    spec.name,
                    raw,
                    spec.allowed,
                )
            self.values[spec.name] = True
            return
        if spec.name == "style":
            self.style(shown, raw)
            return
        words = _COLONS_RE.sub(":", raw).split() if spec.name == "ar" else raw.split()
        if not words:
            if spec.kind in (OPTIONAL, OPTIONAL_WORDS):
                self.values[spec.name] = () if spec.kind == OPTIONAL_WORDS else None
            else:
                self.problem(
                    f"`{shown}` needs a value: {spec.label} must be {spec.allowed}.",
                    spec.name,
                    None,
                    spec.allowed,
                )
            return
        if spec.kind in (VALUE, OPTIONAL) and len(words) > 1:
            typo = _ASPECT_TYPO_RE.fullmatch(raw) if spec.name == "ar" else None
            hint = f" Did you mean `--ar {typo.group(1)}:{typo.group(2)}`?" if typo else ""
            self.problem(
                f"`{shown} {show(raw)}` has more than one value: {spec.label} must be {spec.allowed}.{hint} "
                "Put the prompt text before the parameters.",
                spec.name,
                raw,
                spec.allowed,
            )
            return
        if spec.kind in (WORDS, OPTIONAL_WORDS) and len(words) > MAX_REFERENCES:
            self.problem(
                f"`{shown}` has {len(words)} values; the limit is {MAX_REFERENCES}.",
                spec.name,
                raw,
                f"at most {MAX_REFERENCES} values",
            )
            return
        converted = [self.convert(spec, shown, word, raw) for word in words]
        if any(value is _FAILED for value in converted):
            return
        self.values[spec.name] = tuple(converted) if spec.kind in (WORDS, OPTIONAL_WORDS) else converted[0]

    def convert(self, spec: _Spec, shown: str, word: str, raw: str) -> Any:
        assert spec.convert is not None
        try:
            return spec.convert(word)
        except _Invalid as exc:
            problem = "is out of range" if exc.out_of_range else "is not valid"
            hint = f" Did you mean `{exc.suggestion}`?" if exc.suggestion else ""
            self.problem(
                f"`{shown} {show(word)}` {problem}: {spec.label} must be {spec.allowed}.{hint}",
                spec.name,
                raw,
                spec.allowed,
            )
            return _FAILED

    def style(self, shown: str, raw: str) -> None:
        names = sorted(self.styles)
        allowed = "raw or one of " + ", ".join(names) if names else "raw"
        if not raw:
            self.problem(f"`{shown}` needs a value: the style must be {allowed}.", "style", None, allowed)
            return
        if len(raw.split()) > 1:
            self.problem(
                f"`{shown} {show(raw)}` has more than one value: the style must be {allowed}. "
                "Put the prompt text before the parameters.",
                "style",
                raw,
                allowed,
            )
            return
        name = raw.lower()
        if name == RAW:
            self.values["raw"] = True
        elif name in self.styles:
            self.values["style"] = name
        else:
            close = difflib.get_close_matches(name, [RAW, *names], n=1, cutoff=0.6)
            hint = f" Did you mean `--style {close[0]}`?" if close else ""
            self.problem(
                f"`{shown} {show(raw)}` is not a known style: the style must be {allowed}.{hint}",
                "style",
                raw,
                allowed,
            )

    def unknown(self, typed: str, raw: str) -> None:
        name = typed.lower()
        if name in VIDEO_PARAMETERS:
            self.problem(
                f"`--{show(name)}`: video is not supported; Mirage makes still images.",
                name,
                raw or None,
                "image parameters only",
            )
            return
        if name in LEGACY_PARAMETERS:
            self.note(f"`--{name}` belongs to an old Midjourney model and is ignored.")
            return
        suggestion = _suggest_name(typed)
        hint = f"did you mean `{show(suggestion)}`?" if suggestion else f"known parameters: {_PRIMARY}."
        self.problem(
            f"`--{show(typed)}` is not a known parameter; {hint}",
            typed,
            raw or None,
            ", ".join(KNOWN_PARAMETERS),
        )


_FAILED = object()


def _image_prompts(text: str) -> tuple[tuple[str, ...], str]:
    """Split leading image URLs off the prompt text."""
    urls: list[str] = []
    words = text.split(" ")
    while words:
        # "https://…/a.png, a castle": Discord leaves the comma out of the link, and so do we.
        match = _URL_RE.fullmatch(words[0].rstrip(","))
        if not match:
            break
        urls.append(match.group(1))
        words.pop(0)
    return tuple(urls), " ".join(words)


def _glued_parameters(parser: _Parser, text: str) -> None:
    """Report parameters glued to the word before them (``a cat--ar 16:9``) in prompt or ``--no`` text.

    The grammar reads them as prose (``a cat—dog``), so ``--ar 16:9`` would silently land in the
    prompt. One is reported only when it would parse as that parameter with its value, so prose
    such as ``a man—stop sign`` stays prose; ``--no`` never is, since any text is a valid ``--no``.
    """
    glued = list(_GLUED_RE.finditer(text))
    for index, match in enumerate(glued):
        name = match.group("name").lower()
        spec = _BY_ALIAS.get(name)
        if spec is None or spec.kind == TEXT:
            continue
        end = glued[index + 1].start() if index + 1 < len(glued) else len(text)
        value = _collapse(text[match.end() : end])
        trial = _Parser(parser.styles)
        trial.parameter(name, value)
        if trial.problems:
            continue
        word = text[: match.start()].split()[-1]
        fixed = " ".join(filter(None, (word, f"--{name}", value)))
        parser.problem(
            f"`{show(word + match.group() + (' ' + value if value else ''))}` has no space before "
            f"`--{name}`, so it would be read as prompt text; write `{show(fixed)}`.",
            spec.name,
            value or None,
            f"a space before `--{name}`",
        )


def analyse_prompt(text: str, *, styles: Mapping[str, StylePreset] | None = None) -> ParsedPrompt:
    """Parse one prompt (permutations already expanded) with its notes and repeat count.

    ``styles`` are the presets ``--style`` may name (default: the shipped ones). Raises
    :class:`PromptError` with every problem found.
    """
    parser = _Parser(shipped_presets() if styles is None else styles)
    text = normalise_text(text)
    for match in _SPACED_RE.finditer(text):
        parser.problem(
            f"`{match.group(1)} {match.group(2)}` has a space after the dashes; "
            f"did you mean `--{match.group(2).lower()}`?",
            match.group(2).lower(),
            match.group(0),
            f"--{match.group(2).lower()} without a space",
        )
    matches = list(_PARAM_RE.finditer(text))
    trailing = _TRAILING_RE.search(text)
    if matches and trailing and trailing.start() > matches[0].start():
        # Left on, it would become the last parameter's value: "`--ar 16:9 --` has more than one
        # value", or silently part of a `--no` list.
        marker = trailing.group().strip()
        parser.problem(
            f"The prompt ends with `{marker}` without a parameter name after it; "
            "remove it or finish the parameter, e.g. `--seed 5`.",
            "prompt",
            marker,
            "a parameter name right after the dashes, e.g. `--seed 5`",
        )
        text = text[: trailing.start()]
    _glued_parameters(parser, text[: matches[0].start()] if matches else text)
    for index, match in enumerate(matches):
        end = matches[index + 1].start() if index + 1 < len(matches) else len(text)
        raw = _collapse(text[match.end() : end])
        spec = _BY_ALIAS.get(match.group("name").lower())
        if spec is not None and spec.kind == TEXT:
            _glued_parameters(parser, raw)
        parser.parameter(match.group("name"), raw)
    images, prompt = _image_prompts(_collapse(text[: matches[0].start()] if matches else text))
    params = _build(parser, prompt, images)
    if parser.problems:
        raise PromptError(parser.problems)
    assert params is not None
    return ParsedPrompt(params, tuple(parser.notes), parser.values.get("repeat", 1))


def _check_text(parser: _Parser, prompt: str, images: tuple[str, ...], negative: str) -> None:
    if not prompt and len(images) < 2:
        parser.problem(
            "The prompt is empty: describe the image first, then add parameters, "
            "e.g. `a red fox in the snow --ar 3:2`."
            + (" An image prompt needs some text or a second image." if images else ""),
            "prompt",
            None,
            "some text before the parameters",
        )
    if len(images) > MAX_REFERENCES:
        # Each link is downloaded before the job is accepted, like --sref's and --cref's.
        parser.problem(
            f"The prompt starts with {len(images)} image URLs; the limit is {MAX_REFERENCES}.",
            "prompt",
            str(len(images)),
            f"at most {MAX_REFERENCES} image URLs",
        )
    if len(prompt) > MAX_PROMPT_LENGTH:
        parser.problem(
            f"The prompt is {len(prompt)} characters long; the limit is {MAX_PROMPT_LENGTH}.",
            "prompt",
            show(prompt),
            f"at most {MAX_PROMPT_LENGTH} characters",
        )
    if len(negative) > MAX_NEGATIVE_LENGTH:
        parser.problem(
            f"The `--no` list is {len(negative)} characters long; the limit is {MAX_NEGATIVE_LENGTH}.",
            "no",
            show(negative),
            f"at most {MAX_NEGATIVE_LENGTH} characters",
        )


def _conflicts(parser: _Parser) -> None:
    values = parser.values
    if values.get("stealth") and values.get("public"):
        parser.problem(
            "`--stealth` and `--public` contradict each other; use one of them.",
            "stealth",
            "--public",
            "either --stealth or --public",
        )
    speeds = [name for name in ("fast", "relax", "turbo") if values.get(name)]
    if len(speeds) > 1:
        parser.problem(
            " and ".join(f"`--{name}`" for name in speeds) + " contradict each other; use one of them.",
            speeds[0],
            f"--{speeds[1]}",
            "one of --fast, --relax, --turbo",
        )
    if "version" in values and "niji" in values:
        parser.problem(
            "`--v` and `--niji` pick different models; use one of them.",
            "version",
            "--niji",
            "either --v or --niji",
        )
    if values.get("raw") and values.get("style"):
        parser.problem(
            f"`--raw` means no style, but `--style {values['style']}` asks for one; use one of them.",
            "style",
            values["style"],
            "either --style raw or a style name",
        )


# The parser cannot see /imagine's attachment, which is an image prompt too: the command drops this.
IW_WITHOUT_IMAGE = "`--iw` has no effect without an image URL at the start of the prompt."


def _notes(parser: _Parser, images: tuple[str, ...]) -> None:
    values = parser.values
    for weight, needs, what in (
        ("sw", "sref", "a style reference"),
        ("cw", "cref", "a character reference"),
        ("ow", "oref", "an omni reference"),
    ):
        if weight in values and needs not in values:
            parser.note(f"`--{weight}` has no effect without `--{needs}` ({what}).")
    if "iw" in values and not images:
        parser.note(IW_WITHOUT_IMAGE)


def _build(parser: _Parser, prompt: str, images: tuple[str, ...]) -> GenerationParams | None:
    values = parser.values
    negative = ", ".join(parser.negatives)
    _check_text(parser, prompt, images, negative)
    _conflicts(parser)
    _notes(parser, images)
    parts = split_multiprompt(prompt, parser.problems)
    if parser.problems:
        return None
    fields: dict[str, Any] = {"prompt": prompt, "negative_prompt": negative, "parts": parts}
    if images:
        fields["image_prompts"] = images
    if "ar" in values:
        width, height = values["ar"]
        if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            clamped = (MAX_ASPECT_RATIO, 1) if width > height else (1, MAX_ASPECT_RATIO)
            parser.note(
                f"`--ar {width}:{height}` is wider than Mirage's widest size; "
                f"using {clamped[0]}:{clamped[1]} instead."
            )
            width, height = clamped
        fields["aspect"] = (width, height)
        fields["width"], fields["height"] = nearest_bucket(width, height)
    renames = {
        "iw": "image_weight",
        "exp": "experimental",
        "sref": "style_refs",
        "sw": "style_weight",
        "sv": "style_version",
        "cref": "character_refs",
        "cw": "character_weight",
        "oref": "omni_ref",
        "ow": "omni_weight",
        "p": "personalize",
        "model": "engine",
    }
    direct = ("seed", "chaos", "stylize", "quality", "steps", "sampler", "stop", "weird", "style")
    for name in (*direct, *renames):
        if name in values:
            fields[renames.get(name, name)] = values[name]
    for flag in ("tile", "raw", "draft"):
        fields[flag] = bool(values.get(flag))
    if "version" in values:
        fields["model_profile"] = values["version"]
    elif "niji" in values:
        fields["model_profile"] = f"niji {values['niji'] or DEFAULT_NIJI}"
    for speed in ("fast", "relax", "turbo"):
        if values.get(speed):
            fields["speed"] = speed
    if values.get("stealth"):
        fields["visibility"] = Visibility.STEALTH
    elif values.get("public"):
        fields["visibility"] = Visibility.PUBLIC
    try:
        return GenerationParams(**fields)
    except ValidationError as exc:  # pragma: no cover - every field is range-checked above
        parser.problem("These parameters cannot be combined.", "prompt", None, str(exc))
        return None


def plan_prompts(
    text: str, *, styles: Mapping[str, StylePreset] | None = None, max_jobs: int = MAX_JOBS
) -> PromptPlan:
    """Every job ``text`` asks for: permutations expanded, each parsed, ``--repeat`` applied.

    Raises :class:`PromptError` listing every problem in every permutation, or naming the count
    when there would be more than ``max_jobs`` jobs.
    """
    texts = expand_permutations(normalise_text(text), limit=max_jobs)
    parsed: list[ParsedPrompt] = []
    problems: list[PromptProblem] = []
    for one in texts:
        try:
            parsed.append(analyse_prompt(one, styles=styles))
        except PromptError as exc:
            problems += [problem for problem in exc.problems if problem not in problems]
    if problems:
        raise PromptError(problems)
    total = sum(item.repeat for item in parsed)
    if total > max_jobs:
        raise PromptError(
            f"This prompt makes {total} jobs (permutations times `--repeat`); the limit is {max_jobs}.",
            parameter="repeat",
            value=str(total),
            allowed=f"at most {max_jobs} jobs",
        )
    notes: list[str] = []
    for item in parsed:
        notes += [note for note in item.notes if note not in notes]
    return PromptPlan([item.params for item in parsed for _ in range(item.repeat)], notes)


def parse_prompt(text: str, *, styles: Mapping[str, StylePreset] | None = None) -> GenerationParams:
    """Parse a prompt that makes exactly one job. Raises :class:`PromptError` and nothing else.

    Permutations or ``--repeat`` that make several jobs are refused here with a clear message;
    commands that support them call :func:`plan_prompts`.
    """
    plan = plan_prompts(text, styles=styles)
    if plan.count > 1:
        raise PromptError(
            f"This prompt makes {plan.count} jobs (permutations or `--repeat`); "
            "this command makes one at a time.",
            parameter="repeat",
            value=str(plan.count),
            allowed="one job",
        )
    return plan.params[0]


def _number(value: float) -> str:
    text = f"{value:g}"
    return text[1:] if text.startswith("0.") else text


def prompt_text(params: GenerationParams, seed: int | None = None) -> str:
    """The prompt a member would type to ask for ``params``: text plus every non-default parameter.

    ``seed`` (the resolved seed of a finished job) wins over ``params.seed``. Parsing the result
    gives ``params`` back.
    """
    default = GenerationParams(prompt="")
    words = [f"<{url}>" for url in params.image_prompts]
    if params.prompt:
        words.append(params.prompt)
    if params.negative_prompt:
        words.append(f"--no {params.negative_prompt}")
    if params.aspect != default.aspect:
        words.append(f"--ar {params.aspect[0]}:{params.aspect[1]}")
    simple = (
        ("chaos", "chaos"),
        ("quality", "quality"),
        ("seed", "seed"),
        ("stop", "stop"),
        ("style", "style"),
        ("stylize", "stylize"),
        ("weird", "weird"),
        ("image_weight", "iw"),
    )
    chosen_seed = seed if seed is not None else params.seed
    for attribute, name in simple:
        value = chosen_seed if attribute == "seed" else getattr(params, attribute)
        if value is not None and value != getattr(default, attribute):
            words.append(f"--{name} {_number(value) if isinstance(value, float) else value}")
    if params.raw:
        words.append("--style raw")
    if params.tile:
        words.append("--tile")
    if params.model_profile:
        profile = params.model_profile
        words.append(f"--niji {profile.split()[1]}" if profile.startswith("niji") else f"--v {profile}")
    references = (
        ("style_refs", "sref"),
        ("style_weight", "sw"),
        ("style_version", "sv"),
        ("character_refs", "cref"),
        ("character_weight", "cw"),
        ("omni_ref", "oref"),
        ("omni_weight", "ow"),
        ("experimental", "exp"),
    )
    for attribute, name in references:
        value = getattr(params, attribute)
        if value is None or value == ():
            continue
        words.append(f"--{name} {' '.join(value) if isinstance(value, tuple) else value}")
    if params.personalize is not None:
        words.append(" ".join(["--p", *params.personalize]))
    if params.draft:
        words.append("--draft")
    if params.speed:
        words.append(f"--{params.speed}")
    if params.steps is not None:
        words.append(f"--steps {params.steps}")
    if params.sampler != default.sampler:
        words.append(f"--sampler {params.sampler}")
    if params.engine is not None:
        words.append(f"--model {params.engine}")
    if params.visibility is not None:
        words.append(f"--{params.visibility}")
    return " ".join(words)


# "[": a member's "[text](url)" would show as a disguised link in the bot's own message.
_MARKDOWN_RE = re.compile(r"([\\*_~|`\[])")
_LINK_RE = re.compile(r"(<?https?://[^\s<>]+>?)", re.IGNORECASE)


def parameter_line(params: GenerationParams, seed: int | None = None) -> str:
    """``**a red fox --ar 3:2 --seed 7 --stylize 250**``: the bold line for result messages.

    Markdown in the member's text is escaped so it shows as typed; URLs stay untouched so
    Discord still reads them as links.
    """
    chunks = _LINK_RE.split(prompt_text(params, seed))
    # split() with a group puts the URLs at odd positions.
    escaped = [chunk if index % 2 else _MARKDOWN_RE.sub(r"\\\1", chunk) for index, chunk in enumerate(chunks)]
    return "**" + "".join(escaped) + "**"
