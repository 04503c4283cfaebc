"""Bot behaviour against the fake Discord with a fake dispatcher: no worker needed.

Covers /imagine acceptance and refusals, fairness, delivery paths (progress, failures, timeouts,
token expiry), button permissions, the member and admin commands, and command sync.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, select, update

from bot.models import CreditEntry, Image, Job, JobStatus, Member
from tests.botutil import (
    GRID_IDS,
    FakeDispatcher,
    Harness,
    bot_harness,
    custom_ids,
    finish_grid,
    has_result,
    labels,
    png_bytes,
    row_sizes,
)
from workers.schema import ErrorCode, JobKind

pytestmark = pytest.mark.timeout(60)

EPHEMERAL = 64


@pytest.fixture
async def h(tmp_path: Path, sqlite_url: str) -> Any:
    """A bot over SQLite with a fake dispatcher."""
    async with bot_harness(tmp_path, sqlite_url, FakeDispatcher()) as harness:
        yield harness


async def test_imagine_is_deferred_then_waits(h: Harness) -> None:
    inter = await h.imagine("a red fox in the snow --ar 3:2 --seed 42")
    callback = await inter.callback()
    assert callback.status == 200
    assert callback.callback_type == 5  # deferred: the 3 s deadline is met before any DB work
    message = await inter.wait_original(lambda m: "Waiting to start" in (m.get("content") or ""))
    assert "(position 1)" in message["content"]
    assert "**a red fox in the snow**" in message["content"]
    [request] = await h.dispatcher.wait_sent(1)
    job = await h.job_for(inter)
    assert request.job_id == job.id and request.seed == 42 and request.params.aspect == (3, 2)
    job = await h.wait_job(job.id, lambda j: j.status == JobStatus.QUEUED)
    assert job.cost == 1 and job.kind == JobKind.IMAGINE
    assert job.interaction_token == inter.token and job.application_id == h.fake.application_id


async def credits_used(h: Harness, user_id: int) -> int:
    async with h.sessions() as session:
        member = (await session.scalars(select(Member).where(Member.user_id == user_id))).first()
        return 0 if member is None else member.credits_used


async def test_grid_delivery_and_layout(h: Harness) -> None:
    job, message = await finish_grid(h, "a lighthouse at dusk")
    assert len(custom_ids(message)) == GRID_IDS
    assert row_sizes(message) == [5, 4]
    assert labels(message) == ["U1", "U2", "U3", "U4", "🔄", "V1", "V2", "V3", "V4"]
    assert all(len(cid) <= 100 for cid in custom_ids(message))
    assert custom_ids(message)[0] == f"mj:u:{job.id}:1"
    assert message["content"] == f"**a lighthouse at dusk** - <@{h.fake.user.id}> (fast/public)"
    assert message["attachments"][0]["width"] == 128  # 2x2 grid of 64 px tiles
    assert job.status == JobStatus.DONE and job.delivered and job.message_id == int(message["id"])
    async with h.sessions() as session:
        indexes = sorted((await session.scalars(select(Image.index).where(Image.job_id == job.id))).all())
    assert indexes == [0]  # one grid image; tiles are cut only when a member asks for one
    assert job.id in h.dispatcher.forgotten  # the result backend copy is dropped once stored


async def test_progress_edits_are_throttled_and_carry_a_preview(h: Harness) -> None:
    inter = await h.imagine("a slow painting")
    job = await h.job_for(inter)
    await h.wait_job(job.id, lambda j: j.status == JobStatus.QUEUED)
    preview = png_bytes(16, 16)
    h.dispatcher.start(job.id, 30, preview)
    message = await inter.wait_original(lambda m: "(30%)" in (m.get("content") or ""))
    assert message["attachments"][0]["filename"] == "preview.jpg"
    assert (await h.job(job.id)).status == JobStatus.RUNNING
    edits_before = len([r for r in inter.requests if r.route == "webhook_message_edit"])
    h.dispatcher.start(job.id, 60, preview)
    await inter.wait_original(lambda m: "(60%)" in (m.get("content") or ""))
    edits = [r for r in inter.requests if r.route == "webhook_message_edit"]
    assert len(edits) == edits_before + 1
    gap = edits[-1].at - edits[-2].at
    assert gap >= h.settings.progress_edit_interval_s * 0.9  # at most one edit per interval


@pytest.mark.parametrize(
    "prompt",
    ["a cat --ar 0:1", "a cat --seed -3", "a cat --chaos 500", "a cat --frobnicate", "--ar 1:1"],
)
async def test_malformed_parameters_are_refused_privately_and_free(h: Harness, prompt: str) -> None:
    inter = await h.imagine(prompt)
    callback = await inter.callback()
    assert callback.callback_type == 4
    data = callback.message_payload
    assert data["flags"] & EPHEMERAL
    assert "`" in data["content"]  # names the parameter
    assert await h.job_count() == 0
    assert await credits_used(h, h.fake.user.id) == 0
    assert h.dispatcher.sent == []


async def test_out_of_credits_is_refused_with_reset_time(tmp_path: Path, db_url: str) -> None:
    async with bot_harness(tmp_path, db_url, FakeDispatcher(), credit_limit=1) as h:
        first = await h.imagine("one")
        await h.job_for(first)
        second = await h.imagine("two")
        refusal = await h.fake.wait_for_request(
            lambda r: r.interaction_token == second.token and r.route == "webhook_execute"
        )
        payload = refusal.message_payload
        assert payload["flags"] & EPHEMERAL
        assert "You have 0 credits left; this costs 1" in payload["content"]
        assert "<t:" in payload["content"] and ":R>" in payload["content"]
        # The public "thinking…" message was removed: nothing public says the member is broke.
        assert (
            any(r.route == "webhook_message_delete" for r in second.requests)
            or second.original_message() is None
        )
        assert await h.job_count() == 1
        assert await credits_used(h, h.fake.user.id) == 1


async def test_fairness_caps_running_and_waiting(tmp_path: Path, db_url: str) -> None:
    dispatcher = FakeDispatcher()
    async with bot_harness(
        tmp_path, db_url, dispatcher, max_running_per_member=2, max_waiting_per_member=2
    ) as h:
        alice = h.fake.user
        bob = h.fake.add_member(h.fake.guild, "bob").user
        inters = [await h.imagine(f"prompt {i}", user=alice) for i in range(4)]
        # Interactions are handled concurrently; the queue order is the order they were accepted.
        jobs = sorted([await h.job_for(i) for i in inters], key=lambda j: (j.created_at, j.id))
        await dispatcher.wait_sent(2)
        refused = await h.imagine("one too many", user=alice)
        refusal = await h.fake.wait_for_request(
            lambda r: r.interaction_token == refused.token and r.route == "webhook_execute"
        )
        assert refusal.message_payload["flags"] & EPHEMERAL
        assert "2 job(s) running and 2 waiting" in refusal.message_payload["content"]
        assert await h.job_count() == 4
        assert await credits_used(h, alice.id) == 4  # the refused one was not charged

        # Bob is not stuck behind Alice's backlog: his job goes to the broker at once.
        bob_job = await h.job_for(await h.imagine("bob's turn", user=bob))
        await dispatcher.wait_sent(3)
        assert dispatcher.sent[2].job_id == bob_job.id
        assert [r.job_id for r in dispatcher.sent[:2]] == [jobs[0].id, jobs[1].id]
        statuses = [(await h.job(j.id)).status for j in jobs]
        assert statuses.count(JobStatus.WAITING) == 2

        # One of Alice's finishes: exactly one more of hers is released, the oldest.
        dispatcher.succeed(jobs[0].id)
        h.bot.tracker.wake()
        await dispatcher.wait_sent(4)
        assert dispatcher.sent[3].job_id == jobs[2].id
        await asyncio.sleep(0.3)  # several tracker ticks: nothing else is released
        assert len(dispatcher.sent) == 4
        assert (await h.job(jobs[3].id)).status == JobStatus.WAITING


async def test_broker_down_keeps_job_waiting_until_it_is_back(h: Harness) -> None:
    h.dispatcher.fail_sends = 3
    inter = await h.imagine("patience")
    job = await h.job_for(inter)
    await h.dispatcher.wait_sent(1, timeout=10)
    assert h.dispatcher.sent[0].job_id == job.id
    await h.wait_job(job.id, lambda j: j.status == JobStatus.QUEUED)


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (ErrorCode.CONTENT_POLICY, "content policy"),
        (ErrorCode.BAD_INPUT, "could not be used"),
        (ErrorCode.ENGINE_UNAVAILABLE, "not available"),
        (ErrorCode.TIMEOUT, "too long"),
    ],
)
async def test_failed_job_is_refunded_once_with_a_reason(h: Harness, code: ErrorCode, text: str) -> None:
    inter = await h.imagine("doomed")
    job = await h.job_for(inter)
    await h.wait_job(job.id, lambda j: j.status == JobStatus.QUEUED)
    assert await credits_used(h, h.fake.user.id) == 1
    h.dispatcher.fail(job.id, code, "worker says no")
    message = await inter.wait_original(lambda m: "❌" in (m.get("content") or ""))
    assert text in message["content"]
    assert "Your 1 credit was refunded." in message["content"]
    assert not message.get("components") and not message.get("attachments")
    job = await h.wait_job(job.id, lambda j: j.delivered)
    assert job.status == JobStatus.FAILED and job.error_code == code
    assert await credits_used(h, h.fake.user.id) == 0
    async with h.sessions() as session:
        refunds = (
            await session.scalars(
                select(CreditEntry).where(CreditEntry.job_id == job.id, CreditEntry.kind == "refund")
            )
        ).all()
    assert len(refunds) == 1


async def test_worker_crash_is_refunded(h: Harness) -> None:
    inter = await h.imagine("crashy")
    job = await h.job_for(inter)
    await h.wait_job(job.id, lambda j: j.status == JobStatus.QUEUED)
    h.dispatcher.crash(job.id)
    message = await inter.wait_original(lambda m: "❌" in (m.get("content") or ""))
    assert "engine failed" in message["content"]
    assert await credits_used(h, h.fake.user.id) == 0


async def test_job_past_the_timeout_is_revoked_refunded_and_reported(h: Harness) -> None:
    from datetime import timedelta

    from sqlalchemy import update

    from bot.models import utcnow

    inter = await h.imagine("forever")
    job = await h.job_for(inter)
    await h.wait_job(job.id, lambda j: j.status == JobStatus.QUEUED)
    async with h.sessions() as session, session.begin():
        await session.execute(
            update(Job).where(Job.id == job.id).values(queued_at=utcnow() - timedelta(hours=1))
        )
    message = await inter.wait_original(lambda m: "❌" in (m.get("content") or ""))
    assert "took too long" in message["content"]
    assert job.id in h.dispatcher.revoked
    assert (await h.job(job.id)).error_code == ErrorCode.TIMEOUT
    assert await credits_used(h, h.fake.user.id) == 0


async def test_expired_token_delivers_to_the_channel_with_a_mention(h: Harness) -> None:
    inter = await h.imagine("a very long job")
    job = await h.job_for(inter)
    await h.wait_job(job.id, lambda j: j.status == JobStatus.QUEUED)
    h.fake.expire_token(inter)
    h.dispatcher.succeed(job.id)
    post = await h.fake.wait_for_request(
        lambda r: r.route == "channel_message_create" and r.status == 200, timeout=10
    )
    assert post.path == f"/channels/{h.fake.channel.id}/messages"
    assert post.headers["Authorization"] == "Bot fake-bot-token"
    assert f"<@{h.fake.user.id}>" in post.json["content"]
    assert [int(u) for u in post.json["allowed_mentions"]["users"]] == [h.fake.user.id]
    assert len(post.custom_ids()) == GRID_IDS and post.files
    job = await h.wait_job(job.id, lambda j: j.message_id is not None)
    assert job.delivered and job.message_id == int(post.response["id"])


async def test_delivery_retries_when_discord_is_down(h: Harness) -> None:
    inter = await h.imagine("flaky discord")
    job = await h.job_for(inter)
    await h.wait_job(job.id, lambda j: j.status == JobStatus.QUEUED)
    h.fake.fail_next("PATCH", r"^/webhooks/", 400, {"message": "nope", "code": 0}, times=1)
    h.dispatcher.succeed(job.id)
    await h.wait_job(job.id, lambda j: j.status == JobStatus.DONE and not j.delivered)
    # The claim was released; the tracker's retry (after a short backoff) delivers it.
    message = await inter.wait_original(has_result, timeout=10)
    assert len(custom_ids(message)) == GRID_IDS
    sends = [r for r in inter.requests if r.route == "webhook_message_edit" and r.files]
    assert len([r for r in sends if r.status == 200]) == 1  # delivered exactly once


# --- buttons -------------------------------------------------------------------------------------------


async def press_and_wait(h: Harness, custom_id: str, message: dict[str, Any], **kwargs: Any) -> Any:
    press = await h.fake.press(custom_id, message, **kwargs)
    callback = await press.callback()
    return press, callback


async def test_u_button_crops_the_grid_without_generation(h: Harness) -> None:
    from tests.botutil import attachment_bytes, image_of

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
        "Vary (Subtle)", "Vary (Strong)", "Upscale (Subtle)", "Upscale (Creative)",
        "Zoom Out 2x", "Zoom Out 1.5x", "⬅️", "➡️", "⬆️", "⬇️",
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
    assert job.visibility == "stealth" and "(fast/stealth)" in message["content"]
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


async def test_restart_resumes_jobs_and_delivers(h: Harness) -> None:
    queued = await h.imagine("queued before restart")
    queued_job = await h.job_for(queued)
    await h.wait_job(queued_job.id, lambda j: j.status == JobStatus.QUEUED)
    await h.stop_bot()
    h.dispatcher.succeed(queued_job.id)  # the worker finished while the bot was down
    await h.start_bot()
    message = await queued.wait_original(has_result, timeout=10)
    assert len(custom_ids(message)) == GRID_IDS


async def test_restart_resends_a_delivery_cut_off_mid_send(h: Harness) -> None:
    """A crash after claiming delivery but before Discord confirmed it: the next start sends it."""
    job, _message = await finish_grid(h, "cut off while sending")
    await h.stop_bot()
    # The state such a crash leaves: claimed, never confirmed.
    async with h.sessions() as session, session.begin():
        await session.execute(update(Job).where(Job.id == job.id).values(message_id=None))
    h.fake.clear_requests()
    await h.start_bot()
    resent = await h.wait_job(job.id, lambda j: j.message_id is not None)
    assert resent.delivered
    edit = await h.fake.wait_for_request(
        lambda r: r.method == "PATCH" and job.interaction_token in r.path and r.files, timeout=10
    )
    assert edit.files[0].data


async def test_restart_dispatches_waiting_jobs(tmp_path: Path, sqlite_url: str) -> None:
    dispatcher = FakeDispatcher(fail_sends=1000)  # the broker is down: jobs stay waiting
    async with bot_harness(tmp_path, sqlite_url, dispatcher) as h:
        inter = await h.imagine("held")
        job = await h.job_for(inter)
        await asyncio.sleep(0.2)
        await h.stop_bot()
        assert (await h.job(job.id)).status == JobStatus.WAITING
        dispatcher.fail_sends = 0
        await h.start_bot()
        await dispatcher.wait_sent(1)
        await h.wait_job(job.id, lambda j: j.status == JobStatus.QUEUED)


# --- member commands ------------------------------------------------------------------------------------


async def reply_of(h: Harness, inter: Any) -> dict[str, Any]:
    """The ephemeral answer of a deferred command (its first followup edits the deferral)."""
    request = await h.fake.wait_for_request(
        lambda r: r.interaction_token == inter.token and r.route == "webhook_execute"
    )
    return request.message_payload


async def test_info_shows_credits_jobs_and_mode(h: Harness) -> None:
    await h.job_for(await h.imagine("something"))
    inter = await h.fake.slash("info")
    callback = await inter.callback()
    assert callback.callback_type == 5 and callback.json["data"]["flags"] & EPHEMERAL
    text = (await reply_of(h, inter))["content"]
    assert "Credits: **24** left (1 of 25 used this day)" in text
    assert "<t:" in text
    assert "queued" in text and "Visibility: **public**" in text and "Stable Diffusion XL" in text


async def test_stealth_public_and_settings(h: Harness) -> None:
    inter = await h.fake.slash("stealth")
    assert "Stealth mode is on" in (await reply_of(h, inter))["content"]
    job = await h.job_for(await h.imagine("hidden by default"))
    assert job.visibility == "stealth"
    inter = await h.fake.slash("public")
    assert "Public mode is on" in (await reply_of(h, inter))["content"]

    inter = await h.fake.slash("settings")
    payload = await reply_of(h, inter)
    assert "Your Mirage settings" in payload["content"]
    panel = await inter.wait_original(lambda m: bool(m.get("components")))
    selects = custom_ids(panel)
    assert len(selects) == 3
    press = await h.fake.press(selects[2], panel, values=["16:9"])
    await press.callback()
    async with h.sessions() as session:
        member = (await session.scalars(select(Member).where(Member.user_id == h.fake.user.id))).one()
    assert member.default_aspect == "16:9"
    job = await h.job_for(await h.imagine("uses the default aspect"))
    assert tuple(job.params["aspect"]) == (16, 9)
    # Someone else cannot use my settings panel.
    bob = h.fake.add_member(h.fake.guild, "bob").user
    panel = await inter.wait_original(lambda m: custom_ids(m) and custom_ids(m) != selects)
    press = await h.fake.press(custom_ids(panel)[0], panel, values=["openai"], user=bob)
    callback = await press.callback()
    assert callback.message_payload["flags"] & EPHEMERAL


async def test_gallery_links_member_page_and_latest_jobs(h: Harness) -> None:
    public, _ = await finish_grid(h, "for everyone")
    stealth, _ = await finish_grid(h, "just for me --stealth")
    inter = await h.fake.slash("gallery")
    text = (await reply_of(h, inter))["content"]
    async with h.sessions() as session:
        member = (await session.scalars(select(Member).where(Member.user_id == h.fake.user.id))).one()
    assert f"http://gallery.test/m/{member.public_id}" in text
    assert f"http://gallery.test/j/{public.id}" in text
    assert "just for me" in text and f"/j/{stealth.id}" not in text


# --- admin commands ---------------------------------------------------------------------------------------


async def test_non_admin_is_refused_quota_and_status(h: Harness) -> None:
    bob = h.fake.add_member(h.fake.guild, "bob")
    for name, options, sub in (
        ("quota", {"user": bob.user, "limit": 100}, "set"),
        ("quota", {"user": bob.user}, "show"),
        ("quota", {"limit": 5}, "default"),
        ("status", None, None),
    ):
        inter = await h.fake.slash(name, options, subcommand=sub, user=bob)
        callback = await inter.callback()
        assert callback.callback_type == 4
        assert callback.message_payload["flags"] & EPHEMERAL
        assert "Manage Server" in callback.message_payload["content"]
    async with h.sessions() as session:
        member = (await session.scalars(select(Member).where(Member.user_id == bob.user.id))).first()
    assert member is None or member.credit_limit is None


async def test_admin_manages_quotas(h: Harness) -> None:
    admin_role = h.fake.add_role(h.fake.guild, "mods", permissions=1 << 5)  # MANAGE_GUILD
    admin = h.fake.add_member(h.fake.guild, "modsy", roles=[admin_role])
    alice = h.fake.user

    inter = await h.fake.slash(
        "quota", {"user": alice, "limit": 3, "period": "week"}, subcommand="set", user=admin
    )
    assert "3 credits left: 0 of 3 used this week" in (await reply_of(h, inter))["content"]
    inter = await h.fake.slash("quota", {"user": alice, "amount": 2}, subcommand="grant", user=admin)
    assert "5 credits left" in (await reply_of(h, inter))["content"]
    await h.job_for(await h.imagine("spend one"))
    inter = await h.fake.slash("quota", {"user": alice}, subcommand="show", user=admin)
    assert "4 credits left: 1 of 3 used this week, 2 bonus" in (await reply_of(h, inter))["content"]
    inter = await h.fake.slash("quota", {"user": alice}, subcommand="reset", user=admin)
    assert "Cleared 1 used credits" in (await reply_of(h, inter))["content"]
    inter = await h.fake.slash("quota", {"limit": 7, "period": "month"}, subcommand="default", user=admin)
    assert "7 credits per month" in (await reply_of(h, inter))["content"]


async def test_admin_by_configured_id_sees_status(tmp_path: Path, sqlite_url: str) -> None:
    async with bot_harness(tmp_path, sqlite_url, FakeDispatcher(), start=False) as h:
        h.settings.admin_user_ids = [h.fake.user.id]
        await h.start_bot()
        job = await h.job_for(await h.imagine("counted"))
        await h.wait_job(job.id, lambda j: j.status == JobStatus.QUEUED)  # released to the broker
        inter = await h.fake.slash("status")
        text = (await reply_of(h, inter))["content"]
        assert "Queue `gpu` (sdxl)" in text and "1 queued" in text
        assert "Workers online: **1**" in text
        assert "Last hour: 1 jobs" in text


# --- command sync -------------------------------------------------------------------------------------------


async def test_commands_sync_only_when_changed(h: Harness) -> None:
    puts = [r for r in h.fake.requests if r.method == "PUT" and r.path.endswith("/commands")]
    assert len(puts) == 1
    names = sorted(c["name"] for c in h.fake.commands())
    assert names == ["gallery", "imagine", "info", "public", "quota", "settings", "status", "stealth"]
    await h.restart_bot()
    puts = [r for r in h.fake.requests if r.method == "PUT" and r.path.endswith("/commands")]
    assert len(puts) == 1  # same commands: no second sync


async def test_guild_ids_sync_to_each_guild(tmp_path: Path, sqlite_url: str) -> None:
    async with bot_harness(tmp_path, sqlite_url, FakeDispatcher(), start=False) as h:
        h.settings.discord_guild_ids = [h.fake.guild.id]
        await h.start_bot()
        assert {c["name"] for c in h.fake.commands(h.fake.guild)} >= {"imagine", "quota"}
        assert h.fake.commands() == []


async def test_dalle_jobs_cost_more_and_go_to_the_api_queue(h: Harness) -> None:
    inter = await h.imagine("an oil painting --model dalle")
    job = await h.job_for(inter)
    [request] = await h.dispatcher.wait_sent(1)
    assert job.engine == "openai" and job.cost == 2
    assert request.openai_model == h.settings.openai_model
    assert await credits_used(h, h.fake.user.id) == 2


async def test_member_default_engine_applies(h: Harness) -> None:
    inter = await h.fake.slash("settings")
    panel = await inter.wait_original(lambda m: bool(m.get("components")))
    press = await h.fake.press(custom_ids(panel)[0], panel, values=["openai"])
    await press.callback()
    job = await h.job_for(await h.imagine("uses my default engine"))
    assert job.engine == "openai"
    job = await h.job_for(await h.imagine("but not here --model sdxl"))
    assert job.engine == "sdxl"


async def test_celery_dispatcher_sends_by_name_with_the_job_id() -> None:
    from bot.dispatch import CeleryDispatcher, make_celery_client
    from workers.schema import TASK_OPENAI, TASK_SDXL, Engine, GenerationParams, JobRequest

    app = make_celery_client("memory://", "cache+memory://")
    calls: list[tuple[str, dict[str, Any]]] = []
    app.send_task = lambda name, **kwargs: calls.append((name, kwargs))  # type: ignore[method-assign]
    dispatcher = CeleryDispatcher(app, queues={Engine.SDXL: "gpu-x"})
    request = JobRequest(job_id="j" * 22, kind=JobKind.IMAGINE, params=GenerationParams(prompt="p"), seed=3)
    await dispatcher.send(request, Engine.SDXL)
    await dispatcher.send(request, Engine.OPENAI)
    await dispatcher.close()
    assert calls[0][0] == TASK_SDXL and calls[0][1]["queue"] == "gpu-x" and calls[0][1]["task_id"] == "j" * 22
    assert calls[0][1]["args"] == [request.model_dump(mode="json")]
    assert calls[1][0] == TASK_OPENAI and calls[1][1]["queue"] == "api"


async def test_simultaneous_commands_never_exceed_the_caps(tmp_path: Path, db_url: str) -> None:
    dispatcher = FakeDispatcher()
    async with bot_harness(
        tmp_path, db_url, dispatcher, max_running_per_member=2, max_waiting_per_member=2
    ) as h:
        inters = await asyncio.gather(*(h.imagine(f"burst {i}") for i in range(8)))
        replies = await asyncio.gather(
            *(
                h.fake.wait_for_request(
                    lambda r, i=i: (
                        r.interaction_token == i.token
                        and r.route in ("webhook_execute", "webhook_message_edit")
                    )
                )
                for i in inters
            )
        )
        refused = [r for r in replies if r.route == "webhook_execute"]
        assert len(refused) == 4 and all("Nothing was charged" in r.json["content"] for r in refused)
        assert await h.job_count() == 4
        assert await credits_used(h, h.fake.user.id) == 4
        await dispatcher.wait_sent(2)
        await asyncio.sleep(0.2)
        assert len(dispatcher.sent) == 2
