# Polling loops wait on rows and task states other processes write (no event to wait on), always
# under a timeout.
# ruff: noqa: ASYNC109, ASYNC110
"""The bot process dies and restarts while jobs run: every accepted job is still delivered or refunded.

Six jobs from three members go through the real ``CeleryDispatcher`` and one real worker serving
the tiny model (on the shared Redis, on a queue unique to this module). Each member may run one
job at a time, so at any moment some jobs wait in the database, some sit in the queue and one
runs. The bot is crashed twice: every task it owns is cancelled and its sockets dropped, without
``close()`` (so no graceful tracker stop), as a SIGKILL would. While it is down a job finishes at
the worker. A new bot instance over the same database must deliver every job exactly once (one
message carrying the result per job) and charge each once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from bot.dispatch import CeleryDispatcher
from bot.models import CreditEntry, Job, JobStatus, Member
from tests.botutil import Harness, WorkerProcess, bot_harness, has_result, result_message_ids
from tests.fakes import FakeInteraction
from workers.schema import Engine

pytestmark = [pytest.mark.reliability, pytest.mark.redis, pytest.mark.timeout(180)]

MEMBERS = 3
PER_MEMBER = 2
# Filled in by the test so docs/reliability.md can quote what was measured (printed with -s).
MEASURED: dict[str, float] = {}


async def crash_bot(h: Harness) -> None:
    """Kill the running bot as abruptly as one event loop allows.

    Every task the bot owns (gateway runner, tracker, in-flight deliveries, release sweep,
    metrics poller) is cancelled mid-await and its sockets are dropped; ``MirageBot.close()``,
    which would stop the tracker gracefully and wait for deliveries, is never called.
    """
    bot, runner = h.bot, h.runner
    assert bot is not None and runner is not None
    tracker = bot.tracker
    tasks = [
        runner,
        tracker._task,
        tracker._release_task,
        bot._metrics_task,
        *tracker._inflight.values(),
        *bot.delivery._progress_tasks.values(),
    ]
    live = [task for task in tasks if task is not None and not task.done()]
    for task in live:
        task.cancel()
    await asyncio.gather(*live, return_exceptions=True)
    # What the dead process leaves behind: its sockets close (the fake sees the gateway drop).
    with contextlib.suppress(Exception):
        if bot.ws is not None:
            await bot.ws.close(code=4000)
    with contextlib.suppress(Exception):
        await bot.http.close()
    await bot.delivery.sender.close()
    h.bot = None
    h.runner = None


async def delivered_count(h: Harness) -> int:
    """Jobs whose result message Discord confirmed."""
    async with h.sessions() as session:
        rows = (await session.scalars(select(Job.id).where(Job.message_id.is_not(None)))).all()
    return len(rows)


async def wait_delivered(h: Harness, count: int, timeout: float = 60.0) -> None:
    """Wait until at least ``count`` jobs are delivered."""
    async with asyncio.timeout(timeout):
        while await delivered_count(h) < count:
            await asyncio.sleep(0.05)


async def test_bot_crashes_twice_while_jobs_run(
    worker: WorkerProcess, redis_url: str, tmp_path: Path, sqlite_url: str
) -> None:
    dispatcher = CeleryDispatcher.from_urls(redis_url, redis_url, queues={Engine.SDXL: worker.queue})
    try:
        async with bot_harness(
            tmp_path,
            sqlite_url,
            dispatcher,
            broker_url=redis_url,
            result_backend=redis_url,
            max_running_per_member=1,
        ) as h:
            members = [h.fake.add_member(h.fake.guild, f"restart{i}") for i in range(MEMBERS)]
            inters: list[FakeInteraction] = []
            for n in range(PER_MEMBER):
                for i, member in enumerate(members):
                    inters.append(
                        await h.imagine(f"restart {i}.{n} --steps 2 --seed {10 * i + n}", user=member)
                    )
            job_ids = [(await h.job_for(inter)).id for inter in inters]

            crashes = 0
            downtime_finished = 0
            for target in (1, 3):
                await wait_delivered(h, target)
                await crash_bot(h)
                crashes += 1
                # While the bot is dead the worker goes on: wait for one more task to finish at the
                # worker, whose result only a restarted bot can deliver.
                async with h.sessions() as session:
                    open_ids = (
                        await session.scalars(
                            select(Job.id).where(
                                Job.status.in_((JobStatus.QUEUED.value, JobStatus.RUNNING.value))
                            )
                        )
                    ).all()
                if open_ids:
                    async with asyncio.timeout(60):
                        while not any(s.is_final for s in (await dispatcher.states(open_ids)).values()):
                            await asyncio.sleep(0.1)
                    downtime_finished += 1
                restarted = time.monotonic()
                await h.start_bot()
                MEASURED[f"restart{crashes}_start_s"] = time.monotonic() - restarted

            for inter in inters:
                await inter.wait_original(has_result, timeout=90)
            await wait_delivered(h, len(inters))

            async with h.sessions() as session:
                jobs = {job.id: job for job in (await session.scalars(select(Job))).all()}
                ledger = (await session.execute(select(CreditEntry.job_id, CreditEntry.kind))).all()
                used = sorted((await session.scalars(select(Member.credits_used))).all())
            assert sorted(jobs) == sorted(job_ids)
            for inter, job_id in zip(inters, job_ids, strict=True):
                job = jobs[job_id]
                assert job.status == JobStatus.DONE.value and job.delivered and job.message_id, job_id
                assert len(result_message_ids(h, inter, job_id)) == 1, job_id
                assert ledger.count((job_id, "reserve")) == 1 and ledger.count((job_id, "refund")) == 0
            assert used == [PER_MEMBER] * MEMBERS
            assert crashes == 2 and downtime_finished >= 1
            MEASURED["jobs"] = len(inters)
            MEASURED["finished_while_down"] = downtime_finished
            print(f"\nrestarts: {MEASURED}")
    finally:
        await dispatcher.close()
