"""What a job is, independent of how it runs: who asked, what it does, and the member's defaults.

Plain values and pure functions shared by the job service, the buttons and the message
rendering, so none of them needs to import another to agree on what a job means.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from bot import quota
from bot.models import Job, Member
from bot.settings import BotSettings
from workers.schema import (
    GRID_SIZE,
    MAX_SEED,
    Direction,
    Engine,
    GenerationParams,
    JobKind,
    Visibility,
    nearest_bucket,
)

# Kinds whose result is a single image rather than a 2x2 grid.
SINGLE_IMAGE_KINDS = frozenset({JobKind.UPSCALE, JobKind.CROP})
# Operation details are stored next to the generation parameters in Job.params (the gallery lists
# them: "Strength 0.85"), and so are the engine's notes for the member once the job is done.
OP_KEYS = ("strength", "scale", "direction", "mask_key")
NOTES_KEY = "notes"
NON_GENERATION_KEYS = frozenset({*OP_KEYS, NOTES_KEY})


class JobRefused(Exception):
    """A job the bot will not accept. ``str()`` is the member-facing, ephemeral explanation."""


class TooManyJobs(JobRefused):
    """The member already has the maximum number of jobs running and waiting."""


class NotEnoughCredits(JobRefused):
    """The member cannot afford the job."""

    def __init__(self, message: str, error: quota.InsufficientCredits) -> None:
        super().__init__(message)
        self.error = error


@dataclass(frozen=True, slots=True)
class Actor:
    """Who asked for a job and where: the interaction's facts the job row keeps for delivery."""

    guild_id: int  # 0 for DMs
    channel_id: int
    user_id: int
    display_name: str
    application_id: int | None = None
    interaction_token: str | None = None
    is_admin: bool = False
    reply_message_id: int | None = None  # a follow-up of the interaction to edit, not its original
    channel_nsfw: bool = False  # asked in an age-restricted channel (the result is judged for it)


@dataclass(frozen=True, slots=True)
class Operation:
    """What a job does beyond its prompt: the kind and the knobs a button sets."""

    kind: JobKind
    strength: float | None = None
    scale: float | None = None
    direction: Direction | None = None
    mask_key: str | None = None  # Vary (Region): the media key of the mask (white = repaint)

    def as_dict(self) -> dict[str, Any]:
        """The operation's knobs as JSON for ``Job.params`` (so a restart can rebuild the request)."""
        values = {
            "strength": self.strength,
            "scale": self.scale,
            "direction": self.direction.value if self.direction else None,
            "mask_key": self.mask_key,
        }
        return {key: value for key, value in values.items() if value is not None}

    @classmethod
    def from_job(cls, job: Job) -> Operation:
        """The operation stored on a job row."""
        raw = job.params or {}
        direction = raw.get("direction")
        return cls(
            kind=JobKind(job.kind),
            strength=raw.get("strength"),
            scale=raw.get("scale"),
            direction=Direction(direction) if direction else None,
            mask_key=raw.get("mask_key"),
        )


def generation_params(job: Job) -> GenerationParams:
    """The member's generation parameters stored on a job, without the operation and notes."""
    return GenerationParams.model_validate(
        {k: v for k, v in (job.params or {}).items() if k not in NON_GENERATION_KEYS}
    )


def job_notes(job: Job) -> list[str]:
    """The engine's notes for the member recorded when the job finished."""
    notes = (job.params or {}).get(NOTES_KEY) or []
    return [str(note) for note in notes if str(note).strip()] if isinstance(notes, list) else []


def random_seed() -> int:
    """A fresh seed leaving room for the grid's seed..seed+3."""
    return secrets.randbelow(MAX_SEED - GRID_SIZE + 2)


def grid_count(kind: JobKind) -> int:
    """How many images a job of this kind produces."""
    return 1 if kind in SINGLE_IMAGE_KINDS else GRID_SIZE


def resolve_engine(params: GenerationParams, member: Member | None, settings: BotSettings) -> Engine:
    """``--model`` wins, then the member's default, then the server's configured default."""
    if params.engine is not None:
        return Engine(params.engine)
    if member is not None and member.default_engine:
        try:
            return Engine(member.default_engine)
        except ValueError:
            pass
    return Engine(settings.default_engine)


def resolve_visibility(
    params: GenerationParams | None, member: Member | None, settings: BotSettings
) -> Visibility:
    """``--stealth``/``--public`` wins, then the member's mode, then the configured default."""
    if params is not None and params.visibility is not None:
        return Visibility(params.visibility)
    if member is not None and member.visibility:
        try:
            return Visibility(member.visibility)
        except ValueError:
            pass
    return Visibility(settings.default_visibility)


def apply_member_aspect(params: GenerationParams, member: Member) -> GenerationParams:
    """Use the member's default aspect ratio when the prompt did not say ``--ar``."""
    if "aspect" in params.model_fields_set or not member.default_aspect:
        return params
    try:
        w_text, h_text = member.default_aspect.split(":")
        aspect = (int(w_text), int(h_text))
        width, height = nearest_bucket(*aspect)
    except (ValueError, ZeroDivisionError):
        return params
    return params.model_copy(update={"aspect": aspect, "width": width, "height": height})


def credits_message(exc: quota.InsufficientCredits) -> str:
    """The member-facing refusal for a job they cannot afford."""
    stamp = int(exc.resets_at.timestamp())
    return (
        f"You have {exc.remaining} credit{'s' if exc.remaining != 1 else ''} left; this costs {exc.cost}. "
        f"Your credits reset <t:{stamp}:R>."
    )
