"""The result buttons: the table's custom_ids (every format ever sent keeps parsing to the same
job), the layouts under a result, and presses on the fake Discord: what each starts, who may
press, and presses after a restart."""

from __future__ import annotations

import re
from typing import Any

import pytest
from sqlalchemy import delete
from sqlalchemy.exc import OperationalError

from bot import buttons
from bot.buttons import ACTIONS, TEMPLATE, JobButton, parse_custom_id
from bot.interactions import DATABASE_UNAVAILABLE
from bot.models import Job, JobStatus
from bot.views import DYNAMIC_ITEMS, result_view
from tests.botutil import (
    EPHEMERAL,
    GRID_IDS,
    Harness,
    attachment_bytes,
    credits_used,
    custom_ids,
    finish_grid,
    has_result,
    image_of,
    labels,
    press_and_wait,
    row_sizes,
    styles,
)
from workers.schema import Direction, JobKind

pytestmark = pytest.mark.timeout(60)
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


# Every id format under results and pending jobs, each handled by one registered class.
OTHER_IDS = [f"mj:cz:{JOB}", f"mj:region:{JOB}", f"mj:web:{JOB}", f"mj:fav:{JOB}", f"mj:x:{JOB}"]


def test_the_other_buttons_ids_are_not_job_buttons_and_each_has_one_class() -> None:
    for custom_id in OTHER_IDS:
        assert parse_custom_id(custom_id) is None
        owners = [cls for cls in DYNAMIC_ITEMS if cls.__discord_ui_compiled_template__.fullmatch(custom_id)]  # type: ignore[attr-defined]
        assert len(owners) == 1, custom_id


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
    assert ids[5:] == [f"mj:v:{JOB}:{n}" for n in range(1, 5)] + [f"mj:web:{JOB}"]


def test_single_view_layout_square_and_upscale_rules() -> None:
    square = [item.custom_id for item in result_view(_job(JobKind.CROP), 64, 64).children]  # type: ignore[attr-defined]
    assert f"mj:sq:{JOB}" not in square and f"mj:up:{JOB}:subtle" in square
    wide = [item.custom_id for item in result_view(_job(JobKind.CROP), 96, 64).children]  # type: ignore[attr-defined]
    assert f"mj:sq:{JOB}" in wide
    upscaled = [item.custom_id for item in result_view(_job(JobKind.UPSCALE), 128, 128).children]  # type: ignore[attr-defined]
    assert not any(cid.startswith("mj:up:") for cid in upscaled)  # already 2x


# --- presses on the fake Discord ----------------------------------------------------------------


async def test_u_button_crops_the_grid_without_generation(h: Harness) -> None:
    job, message = await finish_grid(h, "four colours")
    sent_before = len(h.dispatcher.sent)
    press, callback = await press_and_wait(h, f"mj:u:{job.id}:3", message)
    assert callback.callback_type == 5
    result = await press.wait_original(has_result)
    assert len(h.dispatcher.sent) == sent_before  # no generation for U#
    tile = image_of(await attachment_bytes(h.fake, result))
    assert tile.size == (64, 64)
    assert tile.getpixel((10, 10)) == (30, 30, 220)  # the third image of the fake grid
    assert labels(result) == [
        "Vary (Subtle)", "Vary (Strong)", "Vary (Region)", "Upscale (Subtle)", "Upscale (Creative)",
        "Zoom Out 2x", "Zoom Out 1.5x", "Custom Zoom", "⬅️", "➡️", "⬆️", "⬇️", "❤️", "Web",
    ]  # fmt: skip
    assert all(size <= 5 for size in row_sizes(result)) and len(row_sizes(result)) <= 5
    assert "Image #3" in result["content"]
    crop = await h.job_for(press)
    assert (
        crop.kind == JobKind.CROP and crop.cost == 0 and crop.parent_id == job.id and crop.parent_index == 3
    )


async def test_make_square_only_on_non_square_images(h: Harness) -> None:
    inter = await h.imagine("wide --ar 16:9")
    job = await h.job_for(inter)
    await h.wait_job(job.id, lambda j: j.status == JobStatus.QUEUED)
    h.dispatcher.succeed(job.id, size=(96, 48))
    message = await inter.wait_original(has_result)
    press, _ = await press_and_wait(h, f"mj:u:{job.id}:1", message)
    result = await press.wait_original(has_result)
    assert "Make Square" in labels(result)
    assert len(row_sizes(result)) <= 5 and max(row_sizes(result)) <= 5


async def test_a_pan_result_takes_its_new_shape_and_zoom_keeps_it(h: Harness) -> None:
    # As in Midjourney: after a pan the --ar is the new shape, so Zoom Out of one of its images
    # keeps that shape instead of squeezing the picture back into the parent's 1:1.
    job, grid = await finish_grid(h, "a harbour --seed 1000")
    press, _ = await press_and_wait(h, f"mj:u:{job.id}:2", grid)
    crop = await h.job_for(press)
    pan_press, _ = await press_and_wait(h, f"mj:pan:{crop.id}:r", await press.wait_original(has_result))
    pan = await h.job_for(pan_press)
    await h.wait_job(pan.id, lambda j: j.status == JobStatus.QUEUED)
    h.dispatcher.succeed(pan.id, size=(96, 64))
    panned = await pan_press.wait_original(has_result)
    assert "--ar 3:2" in panned["content"]
    tile_press, _ = await press_and_wait(h, f"mj:u:{pan.id}:1", panned)
    tile = await h.job_for(tile_press)
    zoom_press, _ = await press_and_wait(
        h, f"mj:zoom:{tile.id}:2", await tile_press.wait_original(has_result)
    )
    zoom = await h.job_for(zoom_press)
    await h.wait_job(zoom.id, lambda j: j.status == JobStatus.QUEUED)
    assert h.dispatcher.request(zoom.id).params.aspect == (3, 2)


@pytest.mark.parametrize(
    ("button", "kind", "strength", "scale", "direction", "count", "cost"),
    [
        ("mj:v:{id}:2", JobKind.VARIATION, 0.85, None, None, 4, 1),
        ("mj:r:{id}", JobKind.REROLL, None, None, None, 4, 1),
        ("mj:vary:{crop}:subtle", JobKind.VARIATION, 0.5, None, None, 4, 1),
        ("mj:vary:{crop}:strong", JobKind.VARIATION, 0.85, None, None, 4, 1),
        ("mj:up:{crop}:subtle", JobKind.UPSCALE, 0.35, 2.0, None, 1, 1),
        ("mj:up:{crop}:creative", JobKind.UPSCALE, 0.55, 2.0, None, 1, 1),
        ("mj:zoom:{crop}:2", JobKind.ZOOM, None, 2.0, None, 4, 1),
        ("mj:zoom:{crop}:1.5", JobKind.ZOOM, None, 1.5, None, 4, 1),
        ("mj:pan:{crop}:l", JobKind.PAN, None, None, "left", 4, 1),
        ("mj:pan:{crop}:d", JobKind.PAN, None, None, "down", 4, 1),
    ],
)
async def test_buttons_send_the_right_request(
    h: Harness,
    button: str,
    kind: JobKind,
    strength: float | None,
    scale: float | None,
    direction: str | None,
    count: int,
    cost: int,
) -> None:
    job, grid = await finish_grid(h, "a harbour --seed 1000")
    message, target = grid, job
    if "{crop}" in button:
        press, _ = await press_and_wait(h, f"mj:u:{job.id}:2", grid)
        message = await press.wait_original(has_result)
        target = await h.job_for(press)
    press, callback = await press_and_wait(h, button.format(id=job.id, crop=target.id), message)
    assert callback.callback_type == 5
    new = await h.job_for(press)
    await h.dispatcher.wait_sent(2)
    request = h.dispatcher.request(new.id)
    assert request.kind == kind and request.count == count
    assert request.strength == strength and request.scale == scale
    assert (request.direction.value if request.direction else None) == direction
    assert request.params.prompt == "a harbour"
    if kind == JobKind.REROLL:
        assert request.input_image is None and request.seed != 1000
    else:
        assert request.input_image is not None and request.seed == 1000
    assert new.cost == cost and new.parent_id == target.id
    waiting = await press.wait_original(lambda m: "Waiting to start" in (m.get("content") or ""))
    assert waiting["id"] != message["id"]  # a new message, the old grid stays
    h.dispatcher.succeed(new.id)
    result = await press.wait_original(has_result)
    if count == 1:
        assert "Upscaled" in result["content"] and "Upscale (Subtle)" not in labels(result)
    else:
        assert len(custom_ids(result)) == GRID_IDS


async def test_pressing_someone_elses_public_job_charges_the_presser(h: Harness) -> None:
    job, message = await finish_grid(h, "shared")
    bob = h.fake.add_member(h.fake.guild, "bob").user
    press, _ = await press_and_wait(h, f"mj:v:{job.id}:1", message, user=bob)
    new = await h.job_for(press)
    assert new.user_id == bob.id and new.member_id != job.member_id
    assert await credits_used(h, bob.id) == 1
    assert await credits_used(h, h.fake.user.id) == 1


async def test_stealth_buttons_only_work_for_the_owner(h: Harness) -> None:
    job, message = await finish_grid(h, "secret --stealth")
    assert job.visibility == "stealth" and "(fast, stealth)" in message["content"]
    mallory = h.fake.add_member(h.fake.guild, "mallory").user
    count = await h.job_count()
    for custom_id in (f"mj:u:{job.id}:1", f"mj:v:{job.id}:1", f"mj:r:{job.id}"):
        press, callback = await press_and_wait(h, custom_id, message, user=mallory)
        assert callback.callback_type == 4 and callback.message_payload["flags"] & EPHEMERAL
        assert "secret" not in callback.message_payload["content"]
    assert await h.job_count() == count
    # The owner may, and the result stays stealth.
    press, callback = await press_and_wait(h, f"mj:u:{job.id}:1", message)
    assert callback.callback_type == 5
    await press.wait_original(has_result)
    assert (await h.job_for(press)).visibility == "stealth"


async def test_forged_or_deleted_job_ids_are_refused(h: Harness) -> None:
    _job, message = await finish_grid(h, "real")
    forged = dict(message)
    forged["components"] = [
        {
            "type": 1,
            "components": [
                {"type": 2, "style": 2, "label": "U1", "custom_id": "mj:u:AAAAAAAAAAAAAAAAAAAAAA:1"}
            ],
        }
    ]
    forged["id"] = "1"  # not a stored message: the fake sends the forged components as they are
    press = await h.fake.press("mj:u:AAAAAAAAAAAAAAAAAAAAAA:1", forged)
    callback = await press.callback()
    assert callback.callback_type == 4 and callback.message_payload["flags"] & EPHEMERAL
    assert callback.message_payload["content"] == "This job no longer exists."

    # A job deleted from the database (e.g. by an admin) behaves the same.
    async with h.sessions() as session, session.begin():
        await session.execute(delete(Job).where(Job.id == _job.id))
    press = await h.fake.press(f"mj:r:{_job.id}", message)
    callback = await press.callback()
    assert callback.message_payload["content"] == "This job no longer exists."


async def test_buttons_work_after_a_restart(h: Harness) -> None:
    job, message = await finish_grid(h, "persistent")
    await h.restart_bot()
    press, callback = await press_and_wait(h, f"mj:v:{job.id}:4", message)
    assert callback.callback_type == 5
    new = await h.job_for(press)
    assert new.kind == JobKind.VARIATION and new.parent_id == job.id and new.parent_index == 4


async def test_a_pressed_button_turns_blue_and_stays_usable(h: Harness) -> None:
    job, message = await finish_grid(h, "blue buttons")
    before = styles(message)
    assert set(before.values()) == {2}
    press, _ = await press_and_wait(h, f"mj:v:{job.id}:3", message)
    await h.job_for(press)
    marked = await h.fake.wait_for_message(
        lambda m: m["id"] == message["id"] and styles(m).get(f"mj:v:{job.id}:3") == 1
    )
    # Only that button changed; the picture, text, link and layout stayed.
    assert styles(marked) == {**before, f"mj:v:{job.id}:3": 1}
    assert marked["content"] == message["content"] and marked["attachments"] == message["attachments"]
    assert row_sizes(marked) == row_sizes(message) and labels(marked) == labels(message)

    # Pressed again, it still starts a job; the message is not edited a second time.
    edits = len(h.fake.find_requests(route="channel_message_edit"))
    again, callback = await press_and_wait(h, f"mj:v:{job.id}:3", marked)
    assert callback.callback_type == 5
    second = await h.job_for(again)
    assert second.kind == JobKind.VARIATION and second.parent_index == 3
    await h.settle()
    assert len(h.fake.find_requests(route="channel_message_edit")) == edits


async def test_a_refused_press_does_not_turn_blue(h: Harness) -> None:
    job, message = await finish_grid(h, "secret blue --stealth")
    mallory = h.fake.add_member(h.fake.guild, "mallory").user
    await press_and_wait(h, f"mj:r:{job.id}", message, user=mallory)
    await h.settle()
    assert set(styles(h.fake.get_message(message["id"]) or {}).values()) == {2}
    assert h.fake.find_requests(route="channel_message_edit") == []


async def test_quick_presses_on_one_message_all_stay_blue(h: Harness) -> None:
    # A member pressing U1..U4 in a row: each press carries the message as it was when pressed,
    # before the earlier presses' edits landed. No press may undo an earlier one's blue.
    job, message = await finish_grid(h, "four quick presses")
    presses = [await h.fake.press(f"mj:u:{job.id}:{n}", message) for n in range(1, 5)]
    for press in presses:
        await press.wait_original(has_result)
    wanted = {f"mj:u:{job.id}:{n}" for n in range(1, 5)}

    def blue(m: dict[str, Any]) -> set[str]:
        return {cid for cid, style in styles(m).items() if style == 1}

    await h.fake.wait_for_message(lambda m: m["id"] == message["id"] and blue(m) == wanted, timeout=5)
    await h.settle()
    assert blue(h.fake.get_message(message["id"]) or {}) == wanted


async def test_a_press_while_the_database_is_down_is_answered(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    job, message = await finish_grid(h, "no database")

    async def unreachable(_bot: object, _job_id: str) -> Job:
        raise OperationalError("SELECT", {}, ConnectionRefusedError("database down"))

    monkeypatch.setattr(buttons, "load_job", unreachable)
    for custom_id in (f"mj:v:{job.id}:1", f"mj:u:{job.id}:2"):
        _press, callback = await press_and_wait(h, custom_id, message)
        assert callback.callback_type == 4 and callback.message_payload["flags"] & EPHEMERAL
        assert callback.message_payload["content"] == DATABASE_UNAVAILABLE
    assert len(h.dispatcher.sent) == 1
