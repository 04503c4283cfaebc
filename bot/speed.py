"""Speed classes (``--turbo``, ``--fast``, ``--relax``): the bot's release order and what they cost.

At the broker the same classes travel as Celery message priorities (``bot.dispatch``); here they
decide which of a member's waiting jobs goes first and what a relaxed job is charged.
"""

from __future__ import annotations

from collections.abc import Sequence

from bot.models import Job
from bot.settings import BotSettings
from workers.schema import Engine, JobKind

SPEED_RANK = {"turbo": 0, "fast": 1, "relax": 2}
DEFAULT_SPEED = "fast"


def speed_of(job: Job) -> str:
    """A job's speed class; ``fast`` when its prompt named none."""
    speed = (job.params or {}).get("speed")
    return speed if speed in SPEED_RANK else DEFAULT_SPEED


def release_order(jobs: Sequence[Job]) -> list[Job]:
    """Waiting jobs in the order they go to the broker: turbo, fast, relax; oldest first within."""
    return sorted(jobs, key=lambda job: (SPEED_RANK[speed_of(job)], job.created_at, job.id))


def speed_cost(base: int, speed: str | None, relax_factor: float) -> int:
    """Credits for a job of ``base`` cost at ``speed``: relaxed jobs pay the factor, rounded down."""
    return int(base * relax_factor) if speed == "relax" else base


def job_cost(settings: BotSettings, kind: JobKind, engine: Engine, speed: str | None = None) -> int:
    """Credits a job costs: grid (per engine), upscale or crop, times the relax factor if relaxed."""
    if kind == JobKind.CROP:
        return settings.cost_crop
    if kind == JobKind.DESCRIBE:
        return settings.cost_describe  # a caption, no picture: not scaled by speed
    if kind == JobKind.UPSCALE:
        base = settings.cost_upscale
    else:
        base = settings.cost_openai_grid if engine == Engine.OPENAI else settings.cost_sdxl_grid
    return speed_cost(base, speed, settings.relax_cost_factor)
