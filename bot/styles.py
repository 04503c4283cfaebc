"""Style presets for ``--style <name>``: a house look applied to the prompt before generation.

A preset is a TOML file named after the style (``cinematic.toml``)::

    description = "A still from a film."
    prompt = "cinematic film still of {prompt}, shallow depth of field"
    negative = "cartoon, text, watermark"      # optional
    guidance_delta = -0.5                        # optional, added to the --stylize guidance

The project ships a few in ``bot/style_presets/``; an owner adds or overrides presets with files
in an extra folder (same format, a same-named file wins). ``raw`` is reserved: ``--style raw``
(or ``--raw``) means no house style at all.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from workers.schema import GenerationParams, PromptPart, stylize_guidance

SHIPPED_DIR = Path(__file__).with_name("style_presets")
RAW = "raw"
PLACEHOLDER = "{prompt}"
MIN_GUIDANCE, MAX_GUIDANCE = 1.0, 30.0
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


class StyleConfigError(ValueError):
    """A preset file an operator has to fix; the message names the file and the problem."""


@dataclass(frozen=True)
class StylePreset:
    """One ``--style`` preset: a prompt template, a negative prompt and a guidance adjustment."""

    name: str
    prompt: str
    negative: str = ""
    guidance_delta: float = 0.0
    description: str = ""


def _load_file(path: Path) -> StylePreset:
    name = path.stem.lower()
    if not _NAME_RE.fullmatch(name) or name == RAW:
        raise StyleConfigError(
            f"{path}: a style's file name must be 1-32 lowercase letters, digits, '-' or '_', "
            f"and not {RAW!r}."
        )
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise StyleConfigError(f"{path}: cannot read the preset: {exc}") from None
    unknown = set(data) - {"prompt", "negative", "guidance_delta", "description"}
    if unknown:
        raise StyleConfigError(
            f"{path}: unknown keys {', '.join(sorted(unknown))}; "
            "allowed: prompt, negative, guidance_delta, description."
        )
    template = data.get("prompt")
    if not isinstance(template, str) or template.count(PLACEHOLDER) != 1:
        raise StyleConfigError(f"{path}: 'prompt' must be text containing {PLACEHOLDER} exactly once.")
    negative = data.get("negative", "")
    description = data.get("description", "")
    delta = data.get("guidance_delta", 0.0)
    if not isinstance(negative, str) or not isinstance(description, str):
        raise StyleConfigError(f"{path}: 'negative' and 'description' must be text.")
    if isinstance(delta, bool) or not isinstance(delta, int | float) or not -10 <= delta <= 10:
        raise StyleConfigError(f"{path}: 'guidance_delta' must be a number from -10 to 10.")
    return StylePreset(name, template, negative.strip(), float(delta), description.strip())


def load_presets(extra_dirs: Iterable[Path | str] = ()) -> dict[str, StylePreset]:
    """The shipped presets plus those in ``extra_dirs`` (later folders override earlier ones).

    Raises :class:`StyleConfigError` for a malformed file or a missing extra folder.
    """
    presets: dict[str, StylePreset] = {}
    for folder in (SHIPPED_DIR, *map(Path, extra_dirs)):
        if not folder.is_dir():
            raise StyleConfigError(f"{folder}: the style folder does not exist.")
        for path in sorted(folder.glob("*.toml")):
            preset = _load_file(path)
            presets[preset.name] = preset
    return presets


@lru_cache(maxsize=1)
def shipped_presets() -> Mapping[str, StylePreset]:
    """The presets that ship with Mirage, read once."""
    return load_presets()


def choose_preset(
    params: GenerationParams, presets: Mapping[str, StylePreset], house_style: str | None = None
) -> StylePreset | None:
    """The preset a job uses: its ``--style``, else the server's house style unless ``--raw``.

    Raises ``KeyError`` for a name that is not in ``presets`` (the parser already refuses
    unknown names, so this means the presets changed between parsing and running).
    """
    if params.raw:
        return None
    name = params.style or house_style
    return presets[name] if name else None


def apply_style(params: GenerationParams, preset: StylePreset | None) -> GenerationParams:
    """``params`` with ``preset`` applied to its model-side prompt (``None``: unchanged).

    Every positive part goes through the template, so multi-prompt weights keep their meaning;
    the preset's negative becomes a negative part; the guidance moves by the preset's delta.
    ``prompt`` and ``negative_prompt`` (what the member wrote) stay as they are. Apply once.
    """
    if preset is None:
        return params
    before, after = preset.prompt.split(PLACEHOLDER)
    parts = params.parts or (PromptPart(text=params.prompt),)
    styled: list[PromptPart] = []
    for part in parts:
        if part.weight <= 0:
            styled.append(part)
            continue
        emphasis = part.emphasis
        if emphasis:
            emphasis = tuple(piece for piece in ((before, 1.0), *emphasis, (after, 1.0)) if piece[0])
        styled.append(PromptPart(text=before + part.text + after, weight=part.weight, emphasis=emphasis))
    if preset.negative:
        styled.append(PromptPart(text=preset.negative, weight=-1.0))
    update: dict[str, object] = {"parts": tuple(styled), "style": preset.name}
    if preset.guidance_delta:
        base = params.guidance if params.guidance is not None else stylize_guidance(params.stylize)
        update["guidance"] = min(MAX_GUIDANCE, max(MIN_GUIDANCE, base + preset.guidance_delta))
    return params.model_copy(update=update)
