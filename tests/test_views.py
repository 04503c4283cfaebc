"""The layouts under messages: which buttons each result gets, Discord's limits (5 rows of at most 5
buttons, custom_ids of at most 100 characters and unique on a message), and Cancel under a
pending job."""

from __future__ import annotations

from typing import Any

import pytest

from bot.models import Job
from bot.views import DYNAMIC_ITEMS, pending_view, result_view
from workers.schema import JobKind

JOB = "AbC_def-123456789012345"  # 22 characters, as new_token() makes
LONGEST = "Z" * 32  # the longest id the column holds
PUBLIC_URL = "https://gallery.example"


def rows_of(view: Any) -> list[list[dict[str, Any]]]:
    """The view as Discord receives it: rows of component payloads."""
    return [row["components"] for row in view.to_components()]


def ids_of(view: Any) -> list[str]:
    return [c["custom_id"] for row in rows_of(view) for c in row if "custom_id" in c]


def labels_of(view: Any) -> list[list[str]]:
    return [[c.get("label") or c["emoji"]["name"] for c in row] for row in rows_of(view)]


CASES = [
    (JobKind.IMAGINE, 128, 128, "public"),
    (JobKind.VARIATION, 128, 96, "stealth"),
    (JobKind.REGION, 128, 128, "public"),
    (JobKind.CROP, 64, 64, "public"),
    (JobKind.CROP, 96, 64, "stealth"),
    (JobKind.UPSCALE, 128, 128, "public"),
    (JobKind.UPSCALE, 192, 128, "stealth"),
]


@pytest.mark.parametrize(("kind", "width", "height", "visibility"), CASES)
@pytest.mark.parametrize("job_id", [JOB, LONGEST])
def test_every_layout_fits_discords_limits(
    kind: JobKind, width: int, height: int, visibility: str, job_id: str
) -> None:
    view = result_view(
        Job(id=job_id, kind=kind.value, visibility=visibility), width, height, public_url=PUBLIC_URL
    )
    rows = rows_of(view)
    assert 1 <= len(rows) <= 5 and all(1 <= len(row) <= 5 for row in rows)
    ids = ids_of(view)
    assert len(ids) == len(set(ids)) and all(len(cid) <= 100 for cid in ids)
    # Every custom_id is one a registered button class will rebuild after a restart.
    for cid in ids:
        assert any(cls.__discord_ui_compiled_template__.fullmatch(cid) for cls in DYNAMIC_ITEMS), cid  # type: ignore[attr-defined]


def test_grid_layout() -> None:
    view = result_view(Job(id=JOB, kind="imagine", visibility="public"), 128, 128, public_url=PUBLIC_URL)
    assert labels_of(view) == [["U1", "U2", "U3", "U4", "🔄"], ["V1", "V2", "V3", "V4", "Web"]]


def test_single_image_layout() -> None:
    view = result_view(Job(id=JOB, kind="crop", visibility="public"), 96, 64, public_url=PUBLIC_URL)
    assert labels_of(view) == [
        ["Vary (Subtle)", "Vary (Strong)", "Vary (Region)"],
        ["Upscale (Subtle)", "Upscale (Creative)"],
        ["Zoom Out 2x", "Zoom Out 1.5x", "Custom Zoom", "Make Square"],
        ["⬅️", "➡️", "⬆️", "⬇️"],
        ["❤️", "Web"],
    ]
    assert f"mj:region:{JOB}" in ids_of(view) and f"mj:cz:{JOB}" in ids_of(view)
    assert f"mj:fav:{JOB}" in ids_of(view)


def test_web_links_public_jobs_and_is_a_button_for_stealth_ones() -> None:
    public = rows_of(
        result_view(Job(id=JOB, kind="upscale", visibility="public"), 64, 64, public_url=PUBLIC_URL)
    )
    [web] = [c for c in public[-1] if c.get("label") == "Web"]
    assert web["style"] == 5 and web["url"] == f"{PUBLIC_URL}/j/{JOB}" and "custom_id" not in web
    stealth = rows_of(
        result_view(Job(id=JOB, kind="upscale", visibility="stealth"), 64, 64, public_url=PUBLIC_URL)
    )
    [web] = [c for c in stealth[-1] if c.get("label") == "Web"]
    assert web["custom_id"] == f"mj:web:{JOB}" and "url" not in web


def test_pending_messages_offer_cancel() -> None:
    assert ids_of(pending_view(JOB)) == [f"mj:x:{JOB}"]
    assert labels_of(pending_view(JOB)) == [["Cancel"]]


async def test_views_are_stopped_so_discord_py_keeps_none_of_them() -> None:
    # Inside the event loop, as when the bot sends them (a view's stop state needs one).
    assert result_view(Job(id=JOB, kind="imagine", visibility="public"), 64, 64).is_finished()
    assert pending_view(JOB).is_finished()
