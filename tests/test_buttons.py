"""The button table: every custom_id format ever sent keeps parsing to the same job."""

from __future__ import annotations

import re

import pytest

from bot.buttons import ACTIONS, TEMPLATE, JobButton, parse_custom_id
from bot.models import Job
from bot.views import result_view
from workers.schema import Direction, JobKind

JOB = "AbC_def-123456789012345"


@pytest.mark.parametrize(
    ("custom_id", "kind", "index", "knobs"),
    [
        (f"mj:u:{JOB}:1", JobKind.CROP, 1, {}),
        (f"mj:u:{JOB}:4", JobKind.CROP, 4, {}),
        (f"mj:v:{JOB}:2", JobKind.VARIATION, 2, {"strength": 0.85}),
        (f"mj:r:{JOB}", JobKind.REROLL, None, {}),
        (f"mj:vary:{JOB}:subtle", JobKind.VARIATION, None, {"strength": 0.5}),
        (f"mj:vary:{JOB}:strong", JobKind.VARIATION, None, {"strength": 0.85}),
        (f"mj:up:{JOB}:subtle", JobKind.UPSCALE, None, {"strength": 0.35, "scale": 2.0}),
        (f"mj:up:{JOB}:creative", JobKind.UPSCALE, None, {"strength": 0.55, "scale": 2.0}),
        (f"mj:zoom:{JOB}:2", JobKind.ZOOM, None, {"scale": 2.0}),
        (f"mj:zoom:{JOB}:1.5", JobKind.ZOOM, None, {"scale": 1.5}),
        (f"mj:pan:{JOB}:l", JobKind.PAN, None, {"direction": Direction.LEFT.value}),
        (f"mj:pan:{JOB}:d", JobKind.PAN, None, {"direction": Direction.DOWN.value}),
        (f"mj:sq:{JOB}", JobKind.SQUARE, None, {}),
    ],
)
def test_sent_custom_ids_start_the_same_jobs(
    custom_id: str, kind: JobKind, index: int | None, knobs: dict[str, object]
) -> None:
    parsed = parse_custom_id(custom_id)
    assert parsed is not None
    action, job_id, arg = parsed
    operation, parent_index = action.start(arg)
    assert job_id == JOB and operation.kind == kind and parent_index == index
    assert operation.as_dict() == knobs
    # Rebuilding the button from the id gives back exactly that id.
    assert JobButton(action.code, job_id, arg).item.custom_id == custom_id


@pytest.mark.parametrize(
    "custom_id",
    [
        f"mj:u:{JOB}:5",
        f"mj:u:{JOB}",
        f"mj:vary:{JOB}:medium",
        f"mj:zoom:{JOB}:3",
        f"mj:pan:{JOB}:x",
        f"mj:r:{JOB}:1",
        f"mj:sq:{JOB}:1",
        "mj:u:bad/id:1",
        f"mj:nope:{JOB}",
        f"xx:u:{JOB}:1",
        f"mj:vary:{JOB}:subtlestrong",
    ],
)
def test_malformed_ids_are_not_ours(custom_id: str) -> None:
    assert parse_custom_id(custom_id) is None
    assert re.fullmatch(TEMPLATE, custom_id) is None


SAMPLE_ARGS = {
    "u": "1",
    "v": "1",
    "r": "",
    "vary": "subtle",
    "up": "subtle",
    "zoom": "2",
    "pan": "l",
    "sq": "",
}


def test_every_action_has_a_look_and_a_short_id() -> None:
    assert set(ACTIONS) == set(SAMPLE_ARGS)
    for code, arg in SAMPLE_ARGS.items():
        button = JobButton(code, JOB, arg)
        assert button.item.label or button.item.emoji, code
        assert button.item.row == ACTIONS[code].row
        assert len(button.item.custom_id or "") <= 100


def _job(kind: JobKind) -> Job:
    return Job(id=JOB, kind=kind.value)


def test_grid_view_layout() -> None:
    view = result_view(_job(JobKind.IMAGINE), 128, 128)
    ids = [item.custom_id for item in view.children]  # type: ignore[attr-defined]
    assert ids[:5] == [f"mj:u:{JOB}:{n}" for n in range(1, 5)] + [f"mj:r:{JOB}"]
    assert ids[5:] == [f"mj:v:{JOB}:{n}" for n in range(1, 5)]


def test_single_view_layout_square_and_upscale_rules() -> None:
    square = [item.custom_id for item in result_view(_job(JobKind.CROP), 64, 64).children]  # type: ignore[attr-defined]
    assert f"mj:sq:{JOB}" not in square and f"mj:up:{JOB}:subtle" in square
    wide = [item.custom_id for item in result_view(_job(JobKind.CROP), 96, 64).children]  # type: ignore[attr-defined]
    assert f"mj:sq:{JOB}" in wide
    upscaled = [item.custom_id for item in result_view(_job(JobKind.UPSCALE), 128, 128).children]  # type: ignore[attr-defined]
    assert not any(cid.startswith("mj:up:") for cid in upscaled)  # already 2x
