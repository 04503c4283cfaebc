"""Cancel (❌) on a pending job's message: only its owner may, a waiting job is dropped and a
running one revoked at the worker, each refunded exactly once and its message says so; later
presses are answered with what became of the job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from bot.cancel import ALREADY, NOT_YOUR_JOB
from bot.models import CreditEntry, JobStatus, LedgerKind
from tests.botutil import (
    EPHEMERAL,
    FakeDispatcher,
    Harness,
    bot_harness,
    credits_used,
    custom_ids,
    has_result,
    press_and_wait,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def h(tmp_path: Path, sqlite_url: str) -> Any:
    """A bot over SQLite with a fake dispatcher; one running job per member, so a second waits."""
    async with bot_harness(tmp_path, sqlite_url, FakeDispatcher(), max_running_per_member=1) as harness:
        yield harness


async def refunds(h: Harness, job_id: str) -> int:
    """How many refund entries the credit ledger holds for the job."""
    async with h.sessions() as session:
        count = await session.scalar(
            select(func.count())
            .select_from(CreditEntry)
            .where(CreditEntry.job_id == job_id, CreditEntry.kind == LedgerKind.REFUND.value)
        )
    return int(count or 0)


def stale(message: dict[str, Any]) -> dict[str, Any]:
    """A copy of a message as a member's client may still show it after the bot edited it."""
    return {**message, "id": "1"}  # not stored: the fake sends these components as they are


def waiting(message: dict[str, Any]) -> bool:
    return "Waiting to start" in (message.get("content") or "") and bool(message.get("components"))


async def private_answer(press: Any) -> str:
    """The text of the ephemeral answer to a deferred (privately) press."""
    callback = await press.callback()
    assert callback.callback_type == 5 and callback.json["data"]["flags"] & EPHEMERAL
    message = await press.wait_original(lambda m: bool(m.get("content")))
    return str(message["content"])


async def test_a_waiting_job_is_removed_and_refunded_once(h: Harness) -> None:
    first = await h.imagine("runs first")
    await h.wait_job((await h.job_for(first)).id, lambda j: j.status == JobStatus.QUEUED)
    second = await h.imagine("waits behind it")
    job = await h.job_for(second)
    message = await second.wait_original(waiting)
    assert custom_ids(message) == [f"mj:x:{job.id}"]
    assert await credits_used(h, h.fake.user.id) == 2

    press, _ = await press_and_wait(h, f"mj:x:{job.id}", message)
    assert await private_answer(press) == "Cancelled. Your 1 credit was refunded."
    cancelled = await h.wait_job(job.id, lambda j: j.status == JobStatus.CANCELLED)
    assert cancelled.delivered
    final = await second.wait_original(lambda m: "cancelled" in (m.get("content") or ""))
    assert not final.get("components") and "refunded" in final["content"]
    assert await refunds(h, job.id) == 1 and await credits_used(h, h.fake.user.id) == 1
    assert job.id not in [r.job_id for r in h.dispatcher.sent]  # it never reached the broker

    # A second press on the (stale) message: answered, nothing refunded again.
    again, _ = await press_and_wait(h, f"mj:x:{job.id}", stale(message))
    assert await private_answer(again) == ALREADY[JobStatus.CANCELLED]
    assert await refunds(h, job.id) == 1 and await credits_used(h, h.fake.user.id) == 1


async def test_a_running_job_is_revoked_and_refunded_once(h: Harness) -> None:
    inter = await h.imagine("a long one")
    job = await h.job_for(inter)
    await h.wait_job(job.id, lambda j: j.status == JobStatus.QUEUED)
    h.dispatcher.start(job.id, percent=30)
    h.bot.tracker.wake()
    message = await inter.wait_original(lambda m: "(30%)" in (m.get("content") or ""))
    assert custom_ids(message) == [f"mj:x:{job.id}"]  # Cancel stays under the progress
    assert (await h.job(job.id)).status == JobStatus.RUNNING

    press, _ = await press_and_wait(h, f"mj:x:{job.id}", message)
    assert await private_answer(press) == "Cancelled. Your 1 credit was refunded."
    assert h.dispatcher.revoked == [job.id]  # the worker's cancel path stops it
    await h.wait_job(job.id, lambda j: j.status == JobStatus.CANCELLED and j.delivered)
    await inter.wait_original(lambda m: "cancelled" in (m.get("content") or ""))
    await h.settle()  # later tracker passes refund nothing more
    assert await refunds(h, job.id) == 1 and await credits_used(h, h.fake.user.id) == 0

    again, _ = await press_and_wait(h, f"mj:x:{job.id}", stale(message))
    assert await private_answer(again) == ALREADY[JobStatus.CANCELLED]
    assert await refunds(h, job.id) == 1


async def test_only_the_owner_may_cancel(h: Harness) -> None:
    inter = await h.imagine("mine")
    job = await h.job_for(inter)
    message = await inter.wait_original(waiting)
    bob = h.fake.add_member(h.fake.guild, "bob").user
    press, _ = await press_and_wait(h, f"mj:x:{job.id}", message, user=bob)
    assert await private_answer(press) == NOT_YOUR_JOB
    await h.settle()
    assert (await h.job(job.id)).status in (JobStatus.WAITING, JobStatus.QUEUED)
    assert h.dispatcher.revoked == [] and await refunds(h, job.id) == 0


async def test_a_press_after_completion_changes_nothing(h: Harness) -> None:
    inter = await h.imagine("quick")
    job = await h.job_for(inter)
    message = await inter.wait_original(waiting)
    await h.wait_job(job.id, lambda j: j.status == JobStatus.QUEUED)
    h.dispatcher.succeed(job.id)
    h.bot.tracker.wake()
    result = await inter.wait_original(has_result)
    assert f"mj:x:{job.id}" not in custom_ids(result)  # the result replaces Cancel
    press, _ = await press_and_wait(h, f"mj:x:{job.id}", stale(message))
    assert await private_answer(press) == ALREADY[JobStatus.DONE]
    assert (await h.job(job.id)).status == JobStatus.DONE
    assert h.dispatcher.revoked == [] and await refunds(h, job.id) == 0
