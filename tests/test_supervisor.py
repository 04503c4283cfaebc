"""Crash recovery and timeouts through the bot: heartbeats, re-sends, waiting vs running, store outages."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from bot.dispatch import PROGRESS, TaskState
from bot.models import CreditEntry, Job, JobStatus, utcnow
from bot.supervisor import GAVE_UP, LOST, Supervisor, Verdict, heartbeat_token
from tests.botutil import FakeDispatcher, Harness, bot_harness, credits_used, has_result
from workers.schema import ErrorCode

pytestmark = pytest.mark.timeout(60)


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FlakyDispatcher(FakeDispatcher):
    """A fake broker whose result store can be 'down' and whose revokes can go unheard."""

    store_down: bool = False
    revoke_fails: bool = False

    async def states(self, job_ids: Sequence[str]) -> dict[str, TaskState]:
        """Nothing readable while the store is down (as the real dispatcher reports it)."""
        if self.store_down:
            return {}
        return await super().states(job_ids)

    async def revoke(self, job_id: str) -> bool:  # type: ignore[override]
        """False (not heard) while ``revoke_fails``."""
        if self.revoke_fails:
            return False
        await super().revoke(job_id)
        return True


@pytest.fixture
async def h(tmp_path: Path, sqlite_url: str) -> Any:
    """A bot over SQLite with a flaky fake broker and a hand-moved supervisor clock."""
    async with bot_harness(tmp_path, sqlite_url, FlakyDispatcher(), heartbeat_stale_s=45) as harness:
        assert harness.bot is not None
        harness.clock = Clock()  # type: ignore[attr-defined]
        harness.bot.tracker.supervisor.clock = harness.clock  # type: ignore[attr-defined]
        yield harness


def beat(h: Harness, job_id: str, at: float, worker: str = "gpu-1", percent: int = 40) -> None:
    """The worker's PROGRESS meta with a heartbeat, as workers.heartbeat writes it."""
    info = {"job_id": job_id, "percent": percent, "worker": worker, "heartbeat_at": at}
    h.dispatcher.state[job_id] = TaskState(job_id, PROGRESS, info)


async def running_job(h: Harness, prompt: str) -> tuple[Any, Job]:
    inter = await h.imagine(prompt)
    job = await h.job_for(inter)
    await h.wait_job(job.id, lambda j: j.status == JobStatus.QUEUED)
    beat(h, job.id, 1.0)
    await h.wait_job(job.id, lambda j: j.status == JobStatus.RUNNING)
    await h.settle(ticks=2)  # the supervisor has seen this heartbeat before the clock moves
    return inter, job


async def charges(h: Harness, job_id: str) -> list[str]:
    async with h.sessions() as session:
        return list(
            (await session.scalars(select(CreditEntry.kind).where(CreditEntry.job_id == job_id))).all()
        )


def test_heartbeat_token_reads_the_worker_and_its_time() -> None:
    running = TaskState("j", PROGRESS, {"job_id": "j", "percent": 5, "worker": "w", "heartbeat_at": 12.5})
    assert heartbeat_token(running) == ("w", "12.5")
    assert heartbeat_token(TaskState("j", PROGRESS, {"job_id": "j", "percent": 5})) is None
    assert heartbeat_token(TaskState("j", "PENDING")) == LOST  # a running job the store forgot


def test_a_heartbeat_is_stale_only_after_it_stopped_changing_for_the_window() -> None:
    clock = Clock()
    settings = type("S", (), {"heartbeat_stale_s": 45.0, "max_resends": 3})()
    supervisor = Supervisor(settings, None, None, clock=clock)  # type: ignore[arg-type]
    job = Job(id="j1", status=JobStatus.RUNNING.value, resends=0)
    state = TaskState("j1", PROGRESS, {"job_id": "j1", "percent": 5, "worker": "w", "heartbeat_at": 1.0})
    assert supervisor.observe(job, state) is Verdict.ALIVE
    clock.now += 44
    assert supervisor.observe(job, state) is Verdict.ALIVE
    fresh = TaskState("j1", PROGRESS, {"job_id": "j1", "percent": 5, "worker": "w", "heartbeat_at": 11.0})
    clock.now += 10
    assert supervisor.observe(job, fresh) is Verdict.ALIVE  # a new beat restarts the window
    clock.now += 46
    assert supervisor.observe(job, fresh) is Verdict.STALE
    no_beat = TaskState("j1", PROGRESS, {"job_id": "j1", "percent": 5})
    assert supervisor.observe(job, no_beat) is Verdict.UNSUPERVISED


async def test_a_job_whose_worker_died_is_sent_again_under_its_id_and_charged_once(h: Harness) -> None:
    inter, job = await running_job(h, "a lighthouse")
    h.clock.now += 30  # type: ignore[attr-defined]
    beat(h, job.id, 11.0)  # alive: a new beat
    await h.settle()
    assert (await h.job(job.id)).status == JobStatus.RUNNING
    h.clock.now += 46  # type: ignore[attr-defined]  # then nothing for longer than the window
    await h.wait_job(job.id, lambda j: j.resends == 1 and j.status == JobStatus.QUEUED)
    assert [r.job_id for r in h.dispatcher.sent] == [job.id, job.id]  # the same task id
    assert job.id in h.dispatcher.cleared  # the dead run's PROGRESS is dropped, no SUCCESS marker left
    h.dispatcher.succeed(job.id)
    message = await inter.wait_original(has_result)
    assert has_result(message)
    assert await charges(h, job.id) == ["reserve"]
    assert await credits_used(h, h.fake.user.id) == 1


async def test_the_late_result_of_a_presumed_dead_worker_is_ignored_once_delivered(h: Harness) -> None:
    inter, job = await running_job(h, "two runs")
    h.clock.now += 46  # type: ignore[attr-defined]
    await h.wait_job(job.id, lambda j: j.resends == 1 and j.status == JobStatus.QUEUED)
    h.dispatcher.succeed(job.id)  # the re-sent copy finishes first
    await inter.wait_original(has_result)
    done = await h.wait_job(job.id, lambda j: j.status == JobStatus.DONE and j.message_id is not None)
    h.dispatcher.succeed(job.id, noise=True)  # then the old worker's late result lands
    await h.settle()
    after = await h.job(job.id)
    assert after.status == JobStatus.DONE and after.message_id == done.message_id
    assert await charges(h, job.id) == ["reserve"]


async def test_a_job_whose_workers_keep_dying_fails_once_and_is_refunded(h: Harness) -> None:
    assert h.bot is not None
    inter, job = await running_job(h, "cursed")
    async with h.sessions() as session, session.begin():
        await session.execute(update(Job).where(Job.id == job.id).values(resends=h.settings.max_resends))
    h.clock.now += 46  # type: ignore[attr-defined]
    await h.wait_job(job.id, lambda j: j.status == JobStatus.FAILED)
    message = await inter.wait_original(lambda m: "❌" in (m.get("content") or ""))
    assert "refunded" in message["content"]
    assert (await h.job(job.id)).error == GAVE_UP
    assert job.id in h.dispatcher.revoked
    assert await credits_used(h, h.fake.user.id) == 0


async def test_a_running_job_past_the_run_timeout_is_revoked_then_refunded(h: Harness) -> None:
    inter, job = await running_job(h, "forever")
    h.dispatcher.revoke_fails = True  # type: ignore[attr-defined]
    async with h.sessions() as session, session.begin():
        await session.execute(
            update(Job).where(Job.id == job.id).values(started_at=utcnow() - timedelta(hours=1))
        )
    await h.settle(ticks=5)
    assert (await h.job(job.id)).status == JobStatus.RUNNING  # the broker did not hear the revoke
    assert await credits_used(h, h.fake.user.id) == 1
    h.dispatcher.revoke_fails = False  # type: ignore[attr-defined]
    message = await inter.wait_original(lambda m: "❌" in (m.get("content") or ""))
    assert "took too long" in message["content"]
    assert job.id in h.dispatcher.revoked
    assert (await h.job(job.id)).error_code == ErrorCode.TIMEOUT
    assert await credits_used(h, h.fake.user.id) == 0


async def test_waiting_for_a_worker_is_not_refunded_before_the_maximum_wait(h: Harness) -> None:
    inter = await h.imagine("patient")
    job = await h.job_for(inter)
    await h.wait_job(job.id, lambda j: j.status == JobStatus.QUEUED)
    waited = timedelta(seconds=h.settings.max_queue_wait_s - 60)  # longer than any run timeout
    async with h.sessions() as session, session.begin():
        await session.execute(update(Job).where(Job.id == job.id).values(queued_at=utcnow() - waited))
    await h.settle(ticks=5)
    assert (await h.job(job.id)).status == JobStatus.QUEUED
    async with h.sessions() as session, session.begin():
        await session.execute(
            update(Job).where(Job.id == job.id).values(queued_at=utcnow() - waited - timedelta(minutes=2))
        )
    message = await inter.wait_original(lambda m: "❌" in (m.get("content") or ""))
    assert job.id in h.dispatcher.revoked
    assert (await h.job(job.id)).error == "No worker was free to start this job within 6 hours."
    assert await credits_used(h, h.fake.user.id) == 0
    assert message["content"]


async def test_a_result_store_outage_never_fails_a_job(h: Harness) -> None:
    inter, job = await running_job(h, "through the outage")
    h.dispatcher.store_down = True  # type: ignore[attr-defined]
    h.clock.now += 600  # type: ignore[attr-defined]  # long past the heartbeat window
    await h.settle(ticks=5)
    assert (await h.job(job.id)).status == JobStatus.RUNNING
    h.dispatcher.store_down = False  # type: ignore[attr-defined]
    h.dispatcher.succeed(job.id)
    await inter.wait_original(has_result)
    assert await charges(h, job.id) == ["reserve"]


async def test_a_broken_media_store_is_retried_a_few_times_then_the_job_is_refunded(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import bot.tracker

    assert h.bot is not None
    h.bot.tracker.store_retries.delays = (0.05, 0.1, 0.2)
    store = h.bot.tracker.results.store
    attempts: list[str] = []

    async def disk_full(key: str, data: bytes, content_type: str) -> None:
        attempts.append(key)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "put", disk_full)
    inter, job = await running_job(h, "nowhere to put it")
    h.dispatcher.succeed(job.id)
    message = await inter.wait_original(lambda m: "❌" in (m.get("content") or ""))
    assert "refunded" in message["content"]
    failed = await h.job(job.id)
    assert failed.status == JobStatus.FAILED and failed.error == bot.tracker.STORE_FAILED
    await h.settle(ticks=5)
    assert len(attempts) == 4  # the first try and three retries, then no more: no hot loop
    assert await credits_used(h, h.fake.user.id) == 0
    assert job.id in h.dispatcher.forgotten  # finished with: the running slot is released


async def test_a_media_store_that_comes_back_delivers_the_result(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:

    assert h.bot is not None
    h.bot.tracker.store_retries.delays = (0.05, 0.1, 0.2)
    store = h.bot.tracker.results.store
    real_put = store.put
    failures = [OSError(30, "Read-only file system")]

    async def flaky(key: str, data: bytes, content_type: str) -> None:
        if failures:
            raise failures.pop()
        await real_put(key, data, content_type)

    monkeypatch.setattr(store, "put", flaky)
    inter, job = await running_job(h, "read-only for a moment")
    h.dispatcher.succeed(job.id)
    await inter.wait_original(has_result)
    assert await charges(h, job.id) == ["reserve"]
