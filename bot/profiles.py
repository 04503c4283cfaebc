"""Model profiles (``--v 7``, ``--v 6.1``, ``--niji 6``) and the one place a job's look is applied.

``MODEL_PROFILES`` maps a profile name to where and how it runs, as JSON or as the path of a TOML
file with one table per profile::

    {"7": {"queue": "gpu-v7", "loras": {"detail-tweaker": 0.6}, "style": "cinematic"},
     "niji 6": {"queue": "gpu-anime"}}

- ``queue``: the Celery queue of workers loaded with that profile's checkpoint (unset: the
  default SDXL queue);
- ``loras``: LoRA name to weight, sent as ``<lora:name:weight>`` tags, which the SDXL engine reads;
- ``style``: a style preset (bot/styles.py) applied when the prompt names none.

A profile that is not mapped runs on the default model, and the member is told so. Styles and
LoRAs are applied by :meth:`Prompting.prepare` when the worker message is built, never to the
stored job, so the member's prompt stays as they wrote it and is applied exactly once.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.settings import BotSettings
from bot.styles import StylePreset, apply_style, choose_preset, load_presets
from workers.schema import GenerationParams

_LORA_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_QUEUE_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
MAX_LORA_WEIGHT = 4.0


class ProfileConfigError(ValueError):
    """``MODEL_PROFILES`` is malformed; the message says what to fix."""


@dataclass(frozen=True)
class ModelProfile:
    """Where a profile's jobs run and what they get on top of the prompt."""

    name: str
    queue: str | None = None
    loras: dict[str, float] = field(default_factory=dict)
    style: str | None = None


def profile_key(name: str) -> str:
    """``"niji6"``, ``"Niji-6"`` and ``"niji 6"`` are one profile; ``"7.0"`` is ``"7"``."""
    text = " ".join(name.lower().replace("-", " ").split())
    match = re.fullmatch(r"niji ?([0-9.]+)", text)
    if match:
        text = f"niji {match.group(1)}"
    return re.sub(r"(\d+)\.0\b", r"\1", text)


def _profile(name: str, raw: Any) -> ModelProfile:
    if not isinstance(raw, Mapping):
        raise ProfileConfigError(f"MODEL_PROFILES: profile {name!r} must be a table of queue, loras, style.")
    unknown = set(raw) - {"queue", "loras", "style"}
    if unknown:
        raise ProfileConfigError(
            f"MODEL_PROFILES: profile {name!r} has unknown keys {', '.join(sorted(unknown))}; "
            "allowed: queue, loras, style."
        )
    queue = raw.get("queue")
    if queue is not None and (not isinstance(queue, str) or not _QUEUE_RE.fullmatch(queue)):
        raise ProfileConfigError(f"MODEL_PROFILES: profile {name!r}: queue must be a queue name.")
    loras = raw.get("loras") or {}
    if not isinstance(loras, Mapping):
        raise ProfileConfigError(f"MODEL_PROFILES: profile {name!r}: loras must map a name to a weight.")
    checked: dict[str, float] = {}
    for lora, weight in loras.items():
        if not _LORA_NAME_RE.fullmatch(str(lora)):
            raise ProfileConfigError(f"MODEL_PROFILES: profile {name!r}: {lora!r} is not a LoRA name.")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or abs(weight) > MAX_LORA_WEIGHT:
            raise ProfileConfigError(
                f"MODEL_PROFILES: profile {name!r}: LoRA {lora!r} needs a weight from -4 to 4."
            )
        checked[str(lora)] = float(weight)
    style = raw.get("style")
    if style is not None and not isinstance(style, str):
        raise ProfileConfigError(f"MODEL_PROFILES: profile {name!r}: style must be a preset name.")
    return ModelProfile(profile_key(name), queue, checked, style.lower() if style else None)


def load_profiles(value: str) -> dict[str, ModelProfile]:
    """Profiles from ``MODEL_PROFILES``: inline JSON, or a TOML file's path; empty: none."""
    value = value.strip()
    if not value:
        return {}
    if value.startswith("{"):
        try:
            data = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ProfileConfigError(f"MODEL_PROFILES is not valid JSON: {exc}") from None
    else:
        try:
            data = tomllib.loads(Path(value).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ProfileConfigError(f"MODEL_PROFILES: cannot read {value}: {exc}") from None
    if not isinstance(data, Mapping):
        raise ProfileConfigError("MODEL_PROFILES must map profile names to tables.")
    profiles = [_profile(str(name), raw) for name, raw in data.items()]
    return {profile.name: profile for profile in profiles}


def profile_queues(profiles: Mapping[str, ModelProfile]) -> dict[str, str]:
    """Profile name → queue, for the profiles that have their own workers."""
    return {name: profile.queue for name, profile in profiles.items() if profile.queue}


def lora_tags(loras: Mapping[str, float]) -> str:
    """``<lora:name:0.6> <lora:other:1>``, the syntax the SDXL engine reads from the prompt."""
    return " ".join(f"<lora:{name}:{weight:g}>" for name, weight in loras.items())


@dataclass(frozen=True)
class Prompting:
    """The owner's prompt configuration: style presets, house style and model profiles."""

    presets: Mapping[str, StylePreset]
    house_style: str | None = None
    profiles: Mapping[str, ModelProfile] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: BotSettings) -> Prompting:
        """Read ``STYLES_DIR``, ``HOUSE_STYLE`` and ``MODEL_PROFILES``; raise on a setup mistake.

        A house style or profile style that names no preset is refused at start, not at the
        first prompt.
        """
        presets = load_presets([settings.styles_dir] if settings.styles_dir else [])
        house = settings.house_style.strip().lower() or None
        profiles = load_profiles(settings.model_profiles)
        for name, wanted in [("HOUSE_STYLE", house)] + [
            (f"MODEL_PROFILES {p.name!r}", p.style) for p in profiles.values()
        ]:
            if wanted and wanted not in presets:
                raise ProfileConfigError(
                    f"{name}: style {wanted!r} is not a preset; known: {', '.join(sorted(presets))}."
                )
        return cls(presets, house, profiles)

    def profile_for(self, params: GenerationParams) -> ModelProfile | None:
        """The configured profile a job asked for, if any."""
        if not params.model_profile:
            return None
        return self.profiles.get(profile_key(params.model_profile))

    def notes(self, params: GenerationParams) -> list[str]:
        """What the member should know about their profile: unmapped ones use the default model."""
        if params.model_profile and self.profile_for(params) is None:
            shown = params.model_profile
            flag = f"--niji {shown.split()[1]}" if shown.startswith("niji") else f"--v {shown}"
            return [f"`{flag}` is not set up on this server; the default model is used."]
        return []

    def prepare(self, params: GenerationParams) -> GenerationParams:
        """The parameters the worker gets: one style applied once, then the profile's LoRAs.

        Style order: the prompt's ``--style``, else the profile's style, else the house style;
        ``--style raw`` / ``--raw`` skips styles (a profile's LoRAs stay: they are the model).
        """
        profile = self.profile_for(params)
        default_style = (profile.style if profile is not None else None) or self.house_style
        try:
            preset = choose_preset(params, self.presets, default_style)
        except KeyError:
            # The preset was removed since the job was accepted: run it unstyled rather than fail.
            preset = None
        params = apply_style(params, preset)
        # Tags go on ``prompt`` only, after styling, so the style's parts never carry them into
        # the text encoders; the engine takes them from ``prompt``.
        if profile is not None and profile.loras:
            params = params.model_copy(update={"prompt": f"{params.prompt} {lora_tags(profile.loras)}"})
        return params
