"""Which buttons go under which result: the layouts Midjourney members know."""

from __future__ import annotations

from typing import Any

from discord import ui

from bot.buttons import JobButton
from bot.models import Job
from bot.operations import SINGLE_IMAGE_KINDS
from workers.schema import JobKind


def grid_items(job_id: str) -> list[ui.Item[Any]]:
    """Row 1: U1 U2 U3 U4 🔄; row 2: V1 V2 V3 V4."""
    items: list[ui.Item[Any]] = [JobButton("u", job_id, str(n)) for n in range(1, 5)]
    items.append(JobButton("r", job_id))
    items.extend(JobButton("v", job_id, str(n)) for n in range(1, 5))
    return items


def single_items(job_id: str, width: int, height: int, *, upscale: bool = True) -> list[ui.Item[Any]]:
    """The buttons under one image: vary, upscale, zoom, Make Square (non-square only), pan."""
    items: list[ui.Item[Any]] = [JobButton("vary", job_id, "subtle"), JobButton("vary", job_id, "strong")]
    if upscale:
        items += [JobButton("up", job_id, "subtle"), JobButton("up", job_id, "creative")]
    items += [JobButton("zoom", job_id, "2"), JobButton("zoom", job_id, "1.5")]
    if width != height:
        items.append(JobButton("sq", job_id))
    items += [JobButton("pan", job_id, side) for side in ("l", "r", "u", "d")]
    return items


def result_view(job: Job, width: int, height: int) -> ui.View:
    """The view for a finished job's message.

    The view is stopped before it is returned: presses are routed by the dynamic item template,
    so discord.py must not also keep every sent view in memory forever (``timeout=None`` views
    are never evicted).
    """
    view = ui.View(timeout=None)
    kind = JobKind(job.kind)
    if kind in SINGLE_IMAGE_KINDS:
        # An upscaled image offers vary/zoom/pan but not another upscale (it is already 2x).
        items = single_items(job.id, width, height, upscale=kind != JobKind.UPSCALE)
    else:
        items = grid_items(job.id)
    for item in items:
        view.add_item(item)
    view.stop()
    return view
