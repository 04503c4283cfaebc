"""From an engine's pixels to the ``JobResult`` message: one layout, one encode, the timings.

Engines return :class:`workers.output.EngineOutput` (images not yet encoded). This module is the
only place a result image is encoded on the worker: four images become Midjourney's 2x2 grid
and are encoded as one file; a single image (an upscale) is encoded as it is. The bot stores
those bytes as they are and cuts a U# tile out of the grid only when a member asks for one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from workers.imaging import compose_grid, encode_image
from workers.output import EngineOutput
from workers.schema import (
    GRID_SIZE,
    ImageFormat,
    ImageOut,
    JobRequest,
    JobResult,
    Layout,
    SafetyVerdict,
    Timings,
    b64encode_bytes,
)


@dataclass(frozen=True, slots=True)
class EncodeOptions:
    """How result images are encoded (``IMAGE_FORMAT`` / ``IMAGE_COMPRESS_LEVEL``)."""

    image_format: ImageFormat = ImageFormat.WEBP
    compress_level: int | None = None  # None: the format's measured default


def _unique(notes: list[str]) -> list[str]:
    """Notes in their order, each once (an engine may add the same remark per request)."""
    return list(dict.fromkeys(note for note in notes if note))


def build_result(
    request: JobRequest,
    output: EngineOutput,
    started_at: float,
    *,
    engine_s: float,
    load_s: float = 0.0,
    options: EncodeOptions | None = None,
    safety: list[SafetyVerdict] | None = None,
    safety_s: float = 0.0,
    clock: Callable[[], float] = time.perf_counter,
) -> JobResult:
    """The ``JobResult`` for ``output``: a grid of four or a single image, encoded once.

    ``started_at`` is the task's start on ``clock`` (``total_s`` runs from it to the end of the
    encode); ``engine_s`` is the engine's wall time, the generation time when the engine reports
    no phases; ``load_s`` is the engine load this job paid before running (added to the engine's
    own ``output.load_s``). ``safety`` holds the classifier's verdicts, one per image in order,
    and ``safety_s`` the time they took (a ``safety`` phase, not part of the generation time).
    Raises ``ValueError`` for an output that breaks the engine contract (no images, mixed sizes,
    a count that is neither 1 nor 4) or verdicts that do not match the images.
    """
    options = options or EncodeOptions()
    images = output.images
    if not images:
        raise ValueError("the engine returned no images")
    tile_width, tile_height = images[0].size
    if any(image.size != (tile_width, tile_height) for image in images):
        raise ValueError("the engine returned images of different sizes")
    if safety and len(safety) != len(images):
        raise ValueError(f"{len(safety)} safety verdicts for {len(images)} images")
    if len(images) == GRID_SIZE:
        layout, picture = Layout.GRID, compose_grid(images)
    elif len(images) == 1:
        layout, picture = Layout.SINGLE, images[0]
    else:
        raise ValueError(f"the engine returned {len(images)} images; a result has 1 or {GRID_SIZE}")

    encode_started = clock()
    data = encode_image(picture, options.image_format, options.compress_level)
    finished = clock()

    phases = {name: round(seconds, 4) for name, seconds in output.phases.items()}
    generation_s = sum(output.phases.values()) if output.phases else engine_s
    if safety:
        phases["safety"] = round(safety_s, 4)
    return JobResult(
        job_id=request.job_id,
        layout=layout,
        image=ImageOut(
            data_b64=b64encode_bytes(data),
            format=options.image_format,
            width=picture.width,
            height=picture.height,
        ),
        tile_width=tile_width,
        tile_height=tile_height,
        seed=output.seed,
        timings=Timings(
            load_s=round(max(0.0, load_s + output.load_s), 4),
            generation_s=round(max(0.0, generation_s), 4),
            encode_s=round(max(0.0, finished - encode_started), 4),
            total_s=round(max(0.0, finished - started_at), 4),
            phases=phases,
        ),
        report=output.report,
        notes=_unique(output.notes),
        safety=list(safety or []),
    )
