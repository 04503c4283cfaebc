"""Which buttons go under which message: the layouts Midjourney members know.

A grid: U1-U4 and 🔄, then V1-V4 and Web. A single image: Vary (Subtle / Strong / Region),
Upscale, Zoom Out (2x / 1.5x / Custom, Make Square when not square), the pan arrows, then ❤️
and Web. A waiting or running job: Cancel. At most 5 buttons a row and 5 rows; every custom_id
is unique on its message. :data:`DYNAMIC_ITEMS` lists every button class for the client to
register, so presses on messages sent by an earlier process still work.
"""

from __future__ import annotations

from typing import Any

from discord import ui

from bot.buttons import JobButton
from bot.cancel import CancelButton
from bot.custom_zoom import CustomZoomButton
from bot.links import FavouriteButton, WebButton, web_item
from bot.models import Job
from bot.operations import SINGLE_IMAGE_KINDS
from bot.region import RegionButton
from workers.schema import JobKind

DYNAMIC_ITEMS: tuple[type[ui.DynamicItem[Any]], ...] = (
    JobButton,
    CustomZoomButton,
    RegionButton,
    WebButton,
    FavouriteButton,
    CancelButton,
)
GRID_WEB_ROW = 1  # beside V1-V4
REGION_ROW = 0  # beside Vary (Subtle) and (Strong)
CUSTOM_ZOOM_ROW = 2  # beside Zoom Out 2x and 1.5x
LINKS_ROW = 4  # ❤️ and Web, under the pan arrows


def grid_items(job_id: str) -> list[ui.Item[Any]]:
    """Row 1: U1 U2 U3 U4 🔄; row 2: V1 V2 V3 V4 (Web is added by :func:`result_view`)."""
    items: list[ui.Item[Any]] = [JobButton("u", job_id, str(n)) for n in range(1, 5)]
    items.append(JobButton("r", job_id))
    items.extend(JobButton("v", job_id, str(n)) for n in range(1, 5))
    return items


def single_items(job_id: str, width: int, height: int, *, upscale: bool = True) -> list[ui.Item[Any]]:
    """The buttons under one image: vary, upscale, zoom, Make Square (non-square only), pan, ❤️."""
    items: list[ui.Item[Any]] = [
        JobButton("vary", job_id, "subtle"),
        JobButton("vary", job_id, "strong"),
        RegionButton(job_id, row=REGION_ROW),
    ]
    if upscale:
        items += [JobButton("up", job_id, "subtle"), JobButton("up", job_id, "creative")]
    items += [
        JobButton("zoom", job_id, "2"),
        JobButton("zoom", job_id, "1.5"),
        CustomZoomButton(job_id, row=CUSTOM_ZOOM_ROW),
    ]
    if width != height:
        items.append(JobButton("sq", job_id))
    items += [JobButton("pan", job_id, side) for side in ("l", "r", "u", "d")]
    items.append(FavouriteButton(job_id, row=LINKS_ROW))
    return items


def result_view(job: Job, width: int, height: int, *, public_url: str | None = None) -> ui.View:
    """The view for a finished job's message.

    ``public_url`` is the gallery's address for the Web link of a public job; without it Web is
    a button that answers with the link. The view is stopped before it is returned: presses are
    routed by the dynamic item templates, so discord.py must not also keep every sent view in
    memory forever (``timeout=None`` views are never evicted).
    """
    view = ui.View(timeout=None)
    kind = JobKind(job.kind)
    if kind in SINGLE_IMAGE_KINDS:
        # An upscaled image offers vary/zoom/pan but not another upscale (it is already 2x).
        items = single_items(job.id, width, height, upscale=kind != JobKind.UPSCALE)
        web_row = LINKS_ROW
    else:
        items = grid_items(job.id)
        web_row = GRID_WEB_ROW
    if public_url is not None:
        items.append(web_item(job, public_url, web_row))
    else:
        items.append(WebButton(job.id, row=web_row))
    for item in items:
        view.add_item(item)
    view.stop()
    return view


def pending_view(job_id: str) -> ui.View:
    """The view under "Waiting to start…" and the progress messages: Cancel."""
    view = ui.View(timeout=None)
    view.add_item(CancelButton(job_id))
    view.stop()
    return view
