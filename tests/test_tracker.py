"""The tracker through the bot: results, progress, failures and refunds, timeouts, restarts."""

from __future__ import annotations

import asyncio
import logging

import pytest
from sqlalchemy import select, update

from bot.models import CreditEntry, Image, Job, JobStatus
from tests.botutil import (
    GRID_IDS,
    Harness,
    credits_used,
    custom_ids,
    finish_grid,
    has_result,
    labels,
    png_bytes,
    row_sizes,
)
from workers.schema import ErrorCode, Progress

pytestmark = pytest.mark.timeout(60)


async def test_grid_delivery_and_layout(h: Harness) -> None:
    job, message = await finish_grid(h, "a lighthouse at dusk")
    assert len(custom_ids(message)) == GRID_IDS
    assert row_sizes(message) == [5, 5]
    assert labels(message) == ["U1", "U2", "U3", "U4", "🔄", "V1", "V2", "V3", "V4", "Web"]
    assert all(len(cid) <= 100 for cid in custom_ids(message))
    assert custom_ids(message)[0] == f"mj:u:{job.id}:1"
    assert message["content"] == f"**a lighthouse at dusk --seed {job.seed}** - <@{h.fake.user.id}> (fast)"
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


async def test_no_progress_edit_after_another_bot_process_delivered(h: Harness) -> None:
    inter = await h.imagine("two bot processes")
    job = await h.job_for(inter)
    await h.wait_job(job.id, lambda j: j.status == JobStatus.QUEUED)
    h.dispatcher.start(job.id, 30)
    await inter.wait_original(lambda m: "(30%)" in (m.get("content") or ""))
    edits = len([r for r in inter.requests if r.route == "webhook_message_edit"])
    # Another bot process (a rolling restart, a second replica) finished the job and claimed its
    # delivery; this process never saw the result, only a late progress report.
    async with h.sessions() as session, session.begin():
        await session.execute(update(Job).where(Job.id == job.id).values(status="done", delivered=True))
    assert h.bot is not None
    await h.bot.delivery._show_progress(await h.job(job.id), Progress(job_id=job.id, percent=90))
    assert len([r for r in inter.requests if r.route == "webhook_message_edit"]) == edits
    assert (await h.job(job.id)).progress == 30


async def test_the_tracker_loop_ends_when_cancelled_just_as_it_is_woken(h: Harness) -> None:
    # On Python 3.11 asyncio.wait_for swallowed a cancel that came as the wake event fired, so
    # the loop ran on and a close() that cancelled it waited forever (stop() now asks the loop
    # to end between ticks, and cancels only as a fallback).
    assert h.bot is not None
    tracker = h.bot.tracker
    loop_task = tracker._task
    assert loop_task is not None

    async def idle_tick() -> None:
        tracker.ticks += 1

    tracker.tick = idle_tick  # type: ignore[method-assign]  # the loop only waits for its wake
    await h.settle()
    tracker.wake()
    await asyncio.sleep(0)
    loop_task.cancel()
    done, _ = await asyncio.wait({loop_task}, timeout=30)  # the old loop never ended at all
    assert loop_task in done and loop_task.cancelled()


async def test_stop_ends_the_loop_between_ticks_without_cancelling_it(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bot.tracker")
    assert h.bot is not None
    loop_task = h.bot.tracker._task
    assert loop_task is not None
    await h.settle()
    await h.bot.tracker.stop()
    assert loop_task.done() and not loop_task.cancelled()  # no database call was cut short
    assert "tracker stopped" in caplog.text and "did not stop" not in caplog.text


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (ErrorCode.CONTENT_POLICY, "safety system refused"),
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
