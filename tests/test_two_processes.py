"""Two bot processes on one PostgreSQL: fairness release and crash recovery stay exactly-once.

Each "process" here has its own engine, connection pool, job service and broker client, so the
only thing they share is the database, as two shards or two bot containers would.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot import quota
from bot.database import make_engine, make_sessionmaker, upgrade
from bot.jobs import JobService
from bot.lifecycle import Lifecycle
from bot.models import Job, JobStatus, utcnow
from bot.results import Results
from bot.storage import LocalMediaStore
from bot.supervisor import Supervisor
from tests.botutil import FakeDispatcher, make_settings
from workers.schema import JobKind, JobRequest

pytestmark = pytest.mark.timeout(120)


class SlowBroker(FakeDispatcher):
    """A broker that takes a moment to accept, so two processes overlap in their decisions."""

    async def send(self, request: JobRequest, engine: object) -> None:  # type: ignore[override]
        await asyncio.sleep(0.05)
        await super().send(request, engine)  # type: ignore[arg-type]


@dataclass
class Process:
    sessions: async_sessionmaker[AsyncSession]
    broker: SlowBroker
    jobs: JobService
    lifecycle: Lifecycle


@contextlib.asynccontextmanager
async def two_processes(pg_url: str, tmp_path: Path) -> AsyncIterator[tuple[Process, Process]]:
    await asyncio.to_thread(upgrade, pg_url)
    settings = make_settings(tmp_path, pg_url, max_running_per_member=3, max_waiting_per_member=20)
    engines = [make_engine(pg_url), make_engine(pg_url)]
    processes = []
    for engine in engines:
        sessions = make_sessionmaker(engine)
        broker = SlowBroker()
        lifecycle = Lifecycle(sessions)
        results = Results(sessions, LocalMediaStore(tmp_path / "media"))
        jobs = JobService(settings, sessions, broker, lifecycle, results)
        processes.append(Process(sessions, broker, jobs, lifecycle))
    try:
        yield processes[0], processes[1]
    finally:
        for engine in engines:
            await engine.dispose()


async def waiting_jobs(sessions: async_sessionmaker[AsyncSession], count: int) -> tuple[int, list[str]]:
    async with sessions() as session, session.begin():
        member = await quota.get_or_create_member(session, 4242, 77, "two-procs")
        ids = []
        for n in range(count):
            job = Job(
                member_id=member.id,
                user_id=77,
                guild_id=4242,
                channel_id=1,
                kind=JobKind.IMAGINE.value,
                prompt=f"job {n}",
                params={"prompt": f"job {n}"},
                engine="sdxl",
                visibility="public",
                status=JobStatus.WAITING.value,
                cost=0,
                created_at=utcnow(),
            )
            session.add(job)
            await session.flush()
            ids.append(job.id)
        return member.id, ids


async def test_two_processes_releasing_one_member_never_exceed_the_running_cap(
    pg_url: str, tmp_path: Path
) -> None:
    async with two_processes(pg_url, tmp_path) as (a, b):
        member_id, _ids = await waiting_jobs(a.sessions, 8)
        sent = await asyncio.gather(a.jobs.release(member_id), b.jobs.release(member_id))
        assert sum(sent) == 3
        async with a.sessions() as session:
            queued = await session.scalar(
                select(func.count()).where(Job.member_id == member_id, Job.status == JobStatus.QUEUED.value)
            )
        assert queued == 3
        assert len(a.broker.sent) + len(b.broker.sent) == 3


async def test_two_processes_finding_one_dead_worker_send_the_job_again_once(
    pg_url: str, tmp_path: Path
) -> None:
    async with two_processes(pg_url, tmp_path) as (a, b):
        member_id, ids = await waiting_jobs(a.sessions, 1)
        assert await a.jobs.release(member_id) == 1
        await a.lifecycle.running(ids)
        async with a.sessions() as session:
            job = await session.get(Job, ids[0])
        assert job is not None
        requeued = await asyncio.gather(
            *(Supervisor(a.jobs.settings, p.lifecycle, p.broker).recover(job) for p in (a, b))
        )
        assert sorted(requeued) == [False, True]
        resent = await asyncio.gather(a.jobs.release(member_id), b.jobs.release(member_id))
        assert sum(resent) == 1
        assert [r.job_id for r in a.broker.sent + b.broker.sent] == [ids[0], ids[0]]
