"""Credits priced by work, like Midjourney's GPU minutes: pure functions, no database.

A job's cost is its kind's configured base cost (``COST_SDXL_GRID``, ``COST_UPSCALE`` …) scaled by
how much denoising it asks of a GPU compared with the base job, a 25-step grid of four 1-megapixel
images (``PRICE_BASE_STEPS``, ``PRICE_BASE_MEGAPIXELS``, ``PRICE_BASE_IMAGES``)::

    cost = round(base_cost × (steps / base_steps) × (megapixels × images) / (base_mp × base_images))

so today's prices are unchanged for today's jobs, a 150-step upscale costs six times a 25-step
one, and ``--quality 2`` doubles a grid. The denoising work of an SDXL job is proportional to
steps × pixels, which is what the formula counts. OpenAI images are priced per image by the
provider, not by steps, so their step factor is 1. A job with a non-zero base never costs less
than 1 credit; a free kind (the U# crop) stays free. Rounding is half up, so a job a few percent
above the base (a 2x upscale's 4.2 MP output against four 1 MP tiles) keeps the base price.
A relaxed job (``--relax``) then pays ``RELAX_COST_FACTOR`` of that price, rounded down.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bot.settings import BotSettings
from bot.speed import job_cost, speed_cost
from workers.schema import BASE_RESOLUTION, GRID_SIZE, Engine, GenerationParams, JobKind

__all__ = ["PriceBase", "Work", "job_price", "needs_confirmation", "price", "work_of"]

# Kinds that denoise pixels; the others (U# crop, /describe) keep their flat configured cost.
GENERATIONS = frozenset(JobKind) - {JobKind.CROP, JobKind.DESCRIBE}


@dataclass(frozen=True, slots=True)
class PriceBase:
    """The job today's configured costs describe."""

    steps: int = 25
    megapixels: float = 1.0
    images: int = 4


@dataclass(frozen=True, slots=True)
class Work:
    """How much a job asks of a GPU: sampling steps, output megapixels per image, images."""

    steps: int
    megapixels: float
    images: int


def price(base_cost: int, work: Work, base: PriceBase = PriceBase(), *, per_step: bool = True) -> int:
    """Credits for ``work`` when the base job costs ``base_cost``.

    ``per_step=False`` ignores the step count (engines billed per image, not per step).
    """
    if base_cost <= 0:
        return 0
    steps = work.steps / base.steps if per_step else 1.0
    area = (work.megapixels * work.images) / (base.megapixels * base.images)
    scaled = base_cost * steps * area
    # Half up, with a tolerance for float noise (1.0000000002 must not round like 1.5).
    return max(1, math.floor(scaled + 0.5 + 1e-9))


def needs_confirmation(cost: int, confirm_at: int) -> bool:
    """Whether a job this expensive asks its member to confirm before it is charged."""
    return cost >= confirm_at


def work_of(kind: JobKind, engine: Engine, params: GenerationParams, *, scale: float | None = None) -> Work:
    """The work a job of ``kind`` with ``params`` does.

    Sizes are SDXL buckets at ``BASE_RESOLUTION``; an upscale renders one image at ``scale``
    times each side; zoom and pan outpaint a canvas as large as the grid's images.
    """
    steps = params.step_count
    megapixels = params.width * params.height / (BASE_RESOLUTION * BASE_RESOLUTION)
    if kind == JobKind.UPSCALE:
        factor = scale or 2.0
        return Work(steps=steps, megapixels=megapixels * factor * factor, images=1)
    del engine  # every engine renders the same number of images; it changes only the step factor
    images = 1 if kind == JobKind.CROP else GRID_SIZE
    return Work(steps=steps, megapixels=megapixels, images=images)


def job_price(
    settings: BotSettings,
    kind: JobKind,
    engine: Engine,
    params: GenerationParams,
    *,
    scale: float | None = None,
) -> int:
    """A job's cost: its configured base scaled by its work, then its speed class (``bot.speed``)."""
    if kind not in GENERATIONS:
        return job_cost(settings, kind, engine, params.speed)
    reference = PriceBase(
        settings.price_base_steps, settings.price_base_megapixels, settings.price_base_images
    )
    work = work_of(kind, engine, params, scale=scale)
    # --relax pays a fraction of what the work costs: applied to the 1-credit base first, the
    # rounding down would make every relaxed SDXL job free however many steps or pixels it asks.
    priced = price(
        job_cost(settings, kind, engine), work, reference, per_step=Engine(engine) != Engine.OPENAI
    )
    return speed_cost(priced, params.speed, settings.relax_cost_factor)
