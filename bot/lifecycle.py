"""A job's state, owned in one place: every status change and the delivery claim live here.

Life of a job (``bot.models.JobStatus``)::

    waiting ──release──▶ queued ──worker starts──▶ running ──▶ done | failed | cancelled
    (generations start here)   ▲                   (U# crops start here: no worker involved)
         ▲                                            │
         └──── requeue: its worker stopped sending heartbeats (bot.supervisor) ────┘

:data:`TRANSITIONS` declares which moves exist; every move is one conditional UPDATE whose
``WHERE status IN (...)`` lists exactly the states the move may leave, so two processes (or two
tasks) racing to finish the same job cannot both win, and a job cancelled meanwhile is never
resurrected. Asking for a move the table does not allow raises :class:`IllegalTransition`.

Delivery is a claim on a final job (``delivered``): whoever flips it from false to true sends
the final message; a failed send releases it for a later retry. Failing a job refunds its
credits in the same transaction, exactly once (the quota ledger's unique key guarantees it).

Nothing outside this module writes ``Job.status`` or ``Job.delivered``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot import quota
from bot.models import Job, JobStatus, utcnow
from bot.telemetry import record_metric
from workers.schema import ErrorCode, JobKind

log = logging.getLogger(__name__)

WAITING, QUEUED, RUNNING = JobStatus.WAITING, JobStatus.QUEUED, JobStatus.RUNNING
DONE, FAILED, CANCELLED = JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED

# The only moves a job may make. A worker may report SUCCESS before the tracker ever saw it
# running (a fast job between two polls), hence queued → done.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    WAITING: frozenset({QUEUED, FAILED, CANCELLED}),
    QUEUED: frozenset({RUNNING, DONE, FAILED, CANCELLED}),
    # Back in line when the supervisor finds its worker dead; a generation is deterministic
    # (same seed), so running it again on another worker gives the same pixels.
    RUNNING: frozenset({WAITING, DONE, FAILED, CANCELLED}),
    DONE: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}
FINAL = (DONE, FAILED, CANCELLED)
ACTIVE = (QUEUED, RUNNING)  # at the broker
PENDING = (WAITING, QUEUED, RUNNING)
# How far back a final job whose message never went out is still worth delivering.
UNDELIVERED_LOOKBACK = timedelta(days=1)


class IllegalTransition(ValueError):
    """A status change :data:`TRANSITIONS` does not allow."""


def values_of(statuses: Iterable[JobStatus]) -> tuple[str, ...]:
    """Status enum members as the strings stored in the column."""
    return tuple(status.value for status in statuses)


def allowed(source: JobStatus, target: JobStatus) -> bool:
    """Whether a job in ``source`` may move to ``target``."""
    return target in TRANSITIONS[source]


def sources_of(target: JobStatus, only_from: Iterable[JobStatus] | None = None) -> tuple[JobStatus, ...]:
    """The states a move to ``target`` may leave, optionally narrowed to ``only_from``.

    Raises :class:`IllegalTransition` when ``only_from`` names a state that cannot move there.
    """
    if only_from is None:
        found = tuple(source for source in JobStatus if allowed(source, target))
    else:
        found = tuple(only_from)
        for source in found:
            if not allowed(source, target):
                raise IllegalTransition(f"a job cannot go from {source.value} to {target.value}")
    if not found:
        raise IllegalTransition(f"no job can go to {target.value}")
    return found


def initial_status(kind: JobKind) -> JobStatus:
    """Where a new job starts: crops are cut by the bot at once, generations wait for release."""
    return RUNNING if kind == JobKind.CROP else WAITING


@dataclass(frozen=True, slots=True)
class Failed:
    """A job this process just finalised as failed: what metrics and messages need."""

    job_id: str
    kind: str
    engine: str
    code: ErrorCode
    refunded: int  # credits given back by this failure (0 if nothing was reserved)


async def move(
    session: AsyncSession,
    job_id: str,
    target: JobStatus,
    *,
    only_from: Iterable[JobStatus] | None = None,
    values: dict[str, Any] | None = None,
    where: Iterable[Any] = (),
) -> Any | None:
    """In the caller's transaction: move one job to ``target`` if it is in an allowed state.

    Returns the job's (kind, engine, cost) row when it moved, None when it was not in a state
    that may move there (someone else moved it first).
    """
    sources = sources_of(target, only_from)
    result = await session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(values_of(sources)), *where)
        .values(status=target.value, **(values or {}))
        .returning(Job.kind, Job.engine, Job.cost)
    )
    return result.one_or_none()


@dataclass(frozen=True, slots=True)
class OpenWork:
    """What the tracker must look at on one pass."""

    active: Sequence[Job]  # at the broker (queued or running), crops excluded
    crops: Sequence[Job]  # U# crops left running longer than the recovery age (orphans)
    undelivered: Sequence[str]  # final jobs whose message has not gone out yet
    waiting: bool  # whether any job is held back for fairness


async def open_work(
    sessions: async_sessionmaker[AsyncSession], now: datetime, crop_recovery_age: timedelta
) -> OpenWork:
    """Read everything unfinished in one session: active jobs, orphaned crops, undelivered results."""
    not_crop = Job.kind != JobKind.CROP.value
    async with sessions() as session:
        active = (await session.scalars(select(Job).where(Job.status.in_(values_of(ACTIVE)), not_crop))).all()
        crops = (
            await session.scalars(
                select(Job).where(
                    Job.status == RUNNING.value,
                    Job.kind == JobKind.CROP.value,
                    Job.created_at < now - crop_recovery_age,
                )
            )
        ).all()
        undelivered = (
            await session.scalars(
                select(Job.id).where(
                    Job.status.in_(values_of(FINAL)),
                    Job.delivered.is_(False),
                    Job.finished_at > now - UNDELIVERED_LOOKBACK,
                )
            )
        ).all()
        waiting = await session.scalar(select(Job.id).where(Job.status == WAITING.value).limit(1))
    return OpenWork(active, crops, undelivered, waiting is not None)


RELEASE_LOCK_SPACE = 0x4D52  # "MR": the advisory-lock namespace of per-member release decisions


@asynccontextmanager
async def release_lock(sessions: async_sessionmaker[AsyncSession], member_id: int) -> AsyncIterator[None]:
    """Hold a member's release decision against other bot processes until the block ends.

    On PostgreSQL a transaction-scoped advisory lock on its own connection, so two processes
    that finish jobs of the same member at once cannot both see a free slot and send two jobs.
    SQLite serves one machine and one bot process per database file: nothing to take there.
    """
    async with sessions() as session:
        if session.bind is not None and session.bind.dialect.name == "postgresql":
            await session.execute(select(func.pg_advisory_xact_lock(RELEASE_LOCK_SPACE, member_id)))
        yield


class Lifecycle:
    """Status changes and the delivery claim, each in its own transaction unless given one."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.sessions = sessions

    async def queued(self, job_id: str) -> bool:
        """waiting → queued once the broker took the job (never resurrects a cancelled one)."""
        async with self.sessions() as session, session.begin():
            moved = await move(session, job_id, QUEUED, values={"queued_at": utcnow(), "task_id": job_id})
        return moved is not None

    async def running(self, job_ids: Iterable[str], now: datetime | None = None) -> None:
        """queued → running for jobs a worker reported started."""
        now = now or utcnow()
        async with self.sessions() as session, session.begin():
            for job_id in job_ids:
                await move(session, job_id, RUNNING, only_from=(QUEUED,), values={"started_at": now})

    async def requeue(self, job_id: str, resends: int) -> bool:
        """running → waiting for a job whose worker died, counting one more re-send.

        Conditional on the re-send count the caller saw, so when two bot processes find the
        same dead worker only one puts the job back in line (and only one sends it again).
        Crops never reach a worker and are never requeued.
        """
        async with self.sessions() as session, session.begin():
            moved = await move(
                session,
                job_id,
                WAITING,
                only_from=(RUNNING,),
                values={"resends": resends + 1, "started_at": None, "queued_at": None},
                where=(Job.resends == resends, Job.kind != JobKind.CROP.value),
            )
        return moved is not None

    async def finish(
        self, session: AsyncSession, job_id: str, *, generation_s: float | None, crop: bool = False
    ) -> bool:
        """In the caller's transaction: → done and claim its delivery, so it is sent exactly once."""
        now = utcnow()
        values: dict[str, Any] = {
            "delivered": True,
            "progress": 100,
            "finished_at": now,
            "error": None,
            "error_code": None,
            # A job finished between two polls was never seen running.
            "started_at": now if crop else func.coalesce(Job.started_at, Job.queued_at, now),
        }
        if generation_s is not None:
            values["generation_s"] = float(generation_s)
        moved = await move(
            session,
            job_id,
            DONE,
            only_from=(RUNNING,) if crop else ACTIVE,
            values=values,
            where=(Job.delivered.is_(False),),
        )
        return moved is not None

    async def fail_in(
        self,
        session: AsyncSession,
        job_id: str,
        code: ErrorCode,
        message: str,
        *,
        status: JobStatus = FAILED,
    ) -> Failed | None:
        """In the caller's transaction: → failed (or cancelled) and refund, exactly once.

        Returns None when the job was already final (someone else finished it first).
        """
        row = await move(
            session,
            job_id,
            status,
            only_from=PENDING,
            values={
                "error_code": code.value,
                "error": message[:1000],
                "finished_at": utcnow(),
                "delivered": False,
            },
        )
        if row is None:
            return None
        refunded = await quota.refund(session, job_id)
        return Failed(job_id, row[0], row[1], code, row[2] if refunded else 0)

    async def fail(
        self, job_id: str, code: ErrorCode, message: str, *, status: JobStatus = FAILED
    ) -> Failed | None:
        """Fail and refund a job in its own transaction; the tracker then tells the member."""
        async with self.sessions() as session, session.begin():
            failed = await self.fail_in(session, job_id, code, message, status=status)
        if failed is not None:
            record_metric("record_failed", failed.kind, failed.engine, failed.code.value)
            if failed.refunded:
                record_metric("record_refunded", failed.kind, failed.engine, failed.refunded)
        return failed

    async def record_progress(self, job_id: str, percent: int) -> bool:
        """Remember the highest progress shown; False once the job no longer takes progress edits.

        That is once it is final or its final message is claimed, by this bot process or any
        other: the check and the record are one statement, so a progress edit that passes it
        cannot follow a result that another process already sent.
        """
        async with self.sessions() as session, session.begin():
            result = await session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status.not_in(values_of(FINAL)), Job.delivered.is_(False))
                .values(progress=case((Job.progress < percent, percent), else_=Job.progress))
                .returning(Job.id)
            )
            return result.scalar_one_or_none() is not None

    # --- the delivery claim --------------------------------------------------------------------

    async def claim_delivery(self, job_id: str) -> bool:
        """Take the right to send a final job's message; False if it is not final or taken."""
        async with self.sessions() as session, session.begin():
            result = await session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status.in_(values_of(FINAL)), Job.delivered.is_(False))
                .values(delivered=True)
                .returning(Job.id)
            )
            return result.scalar_one_or_none() is not None

    async def release_delivery(self, job_id: str) -> None:
        """Give the claim back after a failed send, for a later retry."""
        async with self.sessions() as session, session.begin():
            await session.execute(update(Job).where(Job.id == job_id).values(delivered=False))

    async def delivered(self, job_id: str, message_id: int | None) -> None:
        """Record the id of the message that carried the result: the delivery is complete."""
        async with self.sessions() as session, session.begin():
            await session.execute(update(Job).where(Job.id == job_id).values(message_id=message_id))

    async def reclaim_interrupted(self) -> int:
        """Release delivery claims a previous process took but never finished sending.

        A claim with no message id means the process stopped between claiming and Discord
        confirming the message. Sending again edits the same interaction message (idempotent)
        or, past the token's life, posts to the channel: a rare duplicate beats a lost result.
        Called once when the tracker starts, before any claim of this process exists.
        """
        async with self.sessions() as session, session.begin():
            result = await session.execute(
                update(Job)
                .where(
                    Job.status.in_(values_of(FINAL)),
                    Job.delivered.is_(True),
                    Job.message_id.is_(None),
                    Job.finished_at > utcnow() - UNDELIVERED_LOOKBACK,
                )
                .values(delivered=False)
                .returning(Job.id)
            )
            reclaimed = list(result.scalars())
        if reclaimed:
            log.warning("re-delivering %d result(s) interrupted by a restart", len(reclaimed))
        return len(reclaimed)
