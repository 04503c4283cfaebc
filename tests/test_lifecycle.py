"""The job lifecycle: the declared transitions, conditional moves, refunds once, the delivery claim."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot import quota
from bot.credits import QuotaDefaults
from bot.lifecycle import (
    FINAL,
    TRANSITIONS,
    IllegalTransition,
    Lifecycle,
    allowed,
    initial_status,
    move,
    sources_of,
)
from bot.models import CreditEntry, Job, JobStatus, LedgerKind, utcnow
from bot.settings import Period
from workers.schema import ErrorCode, JobKind

Sessions = async_sessionmaker[AsyncSession]
DEFAULTS = QuotaDefaults(limit=10, period=Period.DAY)


async def new_job(sessions: Sessions, *, status: JobStatus = JobStatus.WAITING, cost: int = 2) -> str:
    """A job row with its credits reserved, as the job service creates one."""
    async with sessions() as session, session.begin():
        member = await quota.get_or_create_member(session, 1, 2, "someone")
        job = Job(
            member_id=member.id,
            user_id=2,
            guild_id=1,
            channel_id=3,
            kind=JobKind.IMAGINE.value,
            prompt="a fox",
            params={"prompt": "a fox"},
            engine="sdxl",
            visibility="public",
            status=status.value,
            cost=cost,
            created_at=utcnow(),
        )
        session.add(job)
        await session.flush()
        await quota.reserve(session, member.id, job.id, cost, DEFAULTS)
        return job.id


async def status_of(sessions: Sessions, job_id: str) -> JobStatus:
    async with sessions() as session:
        job = await session.get(Job, job_id)
        assert job is not None
        return JobStatus(job.status)


def test_final_states_have_no_way_out_and_every_state_is_declared() -> None:
    assert set(TRANSITIONS) == set(JobStatus)
    for final in FINAL:
        assert TRANSITIONS[final] == frozenset()
    assert allowed(JobStatus.WAITING, JobStatus.QUEUED)
    assert allowed(JobStatus.QUEUED, JobStatus.DONE)  # finished between two polls
    assert not allowed(JobStatus.WAITING, JobStatus.DONE)  # a job never skips the broker
    assert not allowed(JobStatus.RUNNING, JobStatus.QUEUED)
    assert sources_of(JobStatus.RUNNING) == (JobStatus.QUEUED,)


def test_illegal_transitions_raise() -> None:
    with pytest.raises(IllegalTransition, match="from queued to waiting"):
        sources_of(JobStatus.WAITING, only_from=(JobStatus.QUEUED,))
    assert sources_of(JobStatus.WAITING) == (JobStatus.RUNNING,)  # only a requeue goes back
    with pytest.raises(IllegalTransition, match="from done to failed"):
        sources_of(JobStatus.FAILED, only_from=(JobStatus.DONE,))
    with pytest.raises(IllegalTransition, match="from waiting to running"):
        sources_of(JobStatus.RUNNING, only_from=(JobStatus.WAITING,))


def test_crops_start_running_and_generations_wait() -> None:
    assert initial_status(JobKind.CROP) == JobStatus.RUNNING
    assert all(initial_status(kind) == JobStatus.WAITING for kind in JobKind if kind != JobKind.CROP)


async def test_an_illegal_move_changes_nothing(sessions: Sessions) -> None:
    job_id = await new_job(sessions)
    with pytest.raises(IllegalTransition):
        async with sessions() as session, session.begin():
            await move(session, job_id, JobStatus.DONE, only_from=(JobStatus.WAITING,))
    assert await status_of(sessions, job_id) == JobStatus.WAITING


async def test_moves_are_conditional_on_the_current_state(sessions: Sessions) -> None:
    lifecycle = Lifecycle(sessions)
    job_id = await new_job(sessions)
    assert await lifecycle.queued(job_id)
    assert not await lifecycle.queued(job_id)  # already queued: a second release is a no-op
    await lifecycle.running([job_id])
    assert await status_of(sessions, job_id) == JobStatus.RUNNING
    async with sessions() as session, session.begin():
        assert await lifecycle.finish(session, job_id, generation_s=3.5)
    async with sessions() as session, session.begin():
        assert not await lifecycle.finish(session, job_id, generation_s=1.0)  # finished once
    async with sessions() as session:
        job = await session.get(Job, job_id)
        assert job is not None
        assert (job.status, job.generation_s, job.delivered, job.progress) == ("done", 3.5, True, 100)
        assert job.started_at is not None and job.finished_at is not None
    assert await lifecycle.fail(job_id, ErrorCode.ENGINE_ERROR, "too late") is None  # done stays done
    assert await status_of(sessions, job_id) == JobStatus.DONE


async def test_a_cancelled_job_is_never_resurrected(sessions: Sessions) -> None:
    lifecycle = Lifecycle(sessions)
    job_id = await new_job(sessions)
    cancelled = await lifecycle.fail(job_id, ErrorCode.CANCELLED, "stop", status=JobStatus.CANCELLED)
    assert cancelled is not None and cancelled.code == ErrorCode.CANCELLED
    assert not await lifecycle.queued(job_id)  # a release racing the cancel loses
    assert await status_of(sessions, job_id) == JobStatus.CANCELLED


async def test_failing_refunds_exactly_once(sessions: Sessions) -> None:
    lifecycle = Lifecycle(sessions)
    job_id = await new_job(sessions, cost=2)
    first = await lifecycle.fail(job_id, ErrorCode.ENGINE_ERROR, "broke")
    second = await lifecycle.fail(job_id, ErrorCode.TIMEOUT, "broke again")
    assert first is not None and first.refunded == 2 and second is None
    async with sessions() as session:
        refunds = await session.scalar(
            select(func.count())
            .select_from(CreditEntry)
            .where(CreditEntry.job_id == job_id, CreditEntry.kind == LedgerKind.REFUND.value)
        )
        job = await session.get(Job, job_id)
    assert refunds == 1
    assert job is not None and job.error_code == ErrorCode.ENGINE_ERROR and not job.delivered


async def test_delivery_is_claimed_once_and_released_for_a_retry(sessions: Sessions) -> None:
    lifecycle = Lifecycle(sessions)
    job_id = await new_job(sessions)
    assert not await lifecycle.claim_delivery(job_id)  # nothing to deliver before it is final
    await lifecycle.fail(job_id, ErrorCode.ENGINE_ERROR, "broke")
    assert await lifecycle.claim_delivery(job_id)
    assert not await lifecycle.claim_delivery(job_id)
    await lifecycle.release_delivery(job_id)
    assert await lifecycle.claim_delivery(job_id)
    assert await lifecycle.reclaim_interrupted() == 1  # claimed, but no message id recorded
    assert await lifecycle.claim_delivery(job_id)
    await lifecycle.delivered(job_id, 1234)
    assert await lifecycle.reclaim_interrupted() == 0
