"""The tracker: follow every job at the broker and act when its state changes.

A background loop polls the result backend for every queued or running job (one batch per tick,
in the dispatcher's thread pool because Celery's result API blocks). For each job it:

- records it running once a worker reports STARTED/PROGRESS, then shows the progress;
- on SUCCESS checks the result and applies the safety policy to its verdicts (a blocked result
  fails and is refunded), stores it (``bot.results``), marks the job done *and* claims its
  delivery in one transaction, then sends the result;
- on an error outcome, a Celery FAILURE/REVOKED, or a timeout, revokes (for a timeout), then fails
  it and refunds it in one transaction (``bot.lifecycle``), then tells the member why;
- leaves a job whose state cannot be read now (store restarting) alone; that is never a failure;
- times waiting and running apart, and recovers jobs of dead workers (``bot.supervisor``);
- retries a result the media store cannot take, then fails it (``bot.storage.RetrySchedule``).

U# crops never reach the broker: :meth:`Tracker.run_crop` finishes them at once from the stored
grid, and the loop finishes any a crashed process left running.

Nothing is lost across restarts: from the database alone a new bot process resumes queued and
running jobs, dispatches waiting ones and re-sends undelivered results (a claim that a crash left
without its message id is released and sent again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from datetime import timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.content_rules import (
    SAFETY_KEY,
    SafetyAction,
    SafetyPolicy,
    job_verdicts,
    tile_verdicts,
    verdict_payload,
)
from bot.delivery import Delivery, guarded
from bot.dispatch import FAILURE, REVOKED, RUNNING_STATES, SUCCESS, Dispatcher, TaskState
from bot.failure_messages import GRID_GONE, STORE_DOWN, STORE_FAILED
from bot.jobs import JobService
from bot.lifecycle import Lifecycle, open_work
from bot.models import Job, JobStatus, utcnow
from bot.operations import NOTES_KEY
from bot.results import ResultRejected, Results, blocked_detail, check_result, read_outcome, screen
from bot.settings import BotSettings
from bot.storage import MediaNotFound, MediaStoreError, RetrySchedule
from bot.supervisor import GAVE_UP, Action, Supervisor, timeout_message
from bot.telemetry import record_metric
from workers.schema import DescribeResult, ErrorCode, JobFailed, JobKind, JobResult, SafetyVerdict

log = logging.getLogger(__name__)

CROP_RECOVERY_AGE = timedelta(seconds=30)  # a crop "running" longer than this was orphaned


class Tracker:
    """The loop that follows jobs at the broker, finishes them and hands them to delivery."""

    def __init__(
        self,
        settings: BotSettings,
        sessions: async_sessionmaker[AsyncSession],
        dispatcher: Dispatcher,
        jobs: JobService,
        lifecycle: Lifecycle,
        results: Results,
        delivery: Delivery,
        *,
        poll_interval: float = 0.5,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.dispatcher = dispatcher
        self.jobs = jobs
        self.lifecycle = lifecycle
        self.results = results
        self.delivery = delivery
        self.poll_interval = poll_interval
        self._task: asyncio.Task[None] | None = None
        self._stopping = False  # stop() asks the loop to end between ticks
        self._wake = asyncio.Event()
        self._inflight: dict[str, asyncio.Task[Any]] = {}
        self._release_task: asyncio.Task[Any] | None = None
        self.ticks = 0
        self.supervisor = Supervisor(settings, lifecycle, dispatcher)
        self.store_retries = RetrySchedule()  # results the media store could not take yet
        self.safety_policy = SafetyPolicy.from_settings(settings)

    # --- the loop ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the tracker (idempotent)."""
        if self._task is None or self._task.done():
            self._stopping = False
            self._task = asyncio.create_task(self._run(), name="mirage-tracker")

    async def stop(self) -> None:
        """Stop the loop between ticks (a cancel inside a database call can strand a SQLite
        connection holding the write lock; cancelling is the fallback), then wait (bounded) for
        in-flight job handlers and deliveries."""
        if self._task is not None:
            self._stopping = True
            self.wake()
            done, _ = await asyncio.wait({self._task}, timeout=10)
            if not done:
                self._task.cancel()
                if not (await asyncio.wait({self._task}, timeout=10))[0]:
                    log.error("the tracker loop did not stop within 20 s")
            self._task = None
        pending = [task for task in self._inflight.values() if not task.done()]
        if self._release_task and not self._release_task.done():
            pending.append(self._release_task)
        if pending:
            _done, still = await asyncio.wait(pending, timeout=10)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still, timeout=5)  # their cleanup (rollbacks) before we return
        await self.delivery.stop()

    def wake(self) -> None:
        """Run the next tick now (a job was created or finished)."""
        self._wake.set()

    async def _run(self) -> None:
        log.info("tracker started (poll every %.2fs)", self.poll_interval)
        try:
            await self.lifecycle.reclaim_interrupted()
        except Exception:
            log.exception("could not reclaim interrupted deliveries")
        self._spawn_release()
        while not self._stopping:
            # Cleared before the tick, so a wake() during the tick triggers the next one at once.
            self._wake.clear()
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("tracker tick failed")
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancel that
            # lands as the wake event fires, and stop() then waited on this loop forever.
            if self._stopping:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval):
                    await self._wake.wait()
        log.info("tracker stopped")

    def _spawn(self, job_id: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any] | None:
        """Run a job's handler unless one is already running for it."""
        current = self._inflight.get(job_id)
        if current is not None and not current.done():
            coro.close()
            return None
        task = asyncio.create_task(guarded(job_id, coro), name=f"job-{job_id}")
        self._inflight[job_id] = task
        task.add_done_callback(lambda done, jid=job_id: self._untrack(jid, done))
        return task

    def _untrack(self, job_id: str, done: asyncio.Task[Any]) -> None:
        # Only if it is still this task: a newer one may already have taken the slot.
        if self._inflight.get(job_id) is done:
            del self._inflight[job_id]

    def _spawn_release(self) -> None:
        if self._release_task is None or self._release_task.done():
            self._release_task = asyncio.create_task(guarded("release", self._release_all(), in_job=False))

    async def _release_all(self) -> None:
        await self.jobs.release_all()
        self.wake()  # a job that failed before reaching the broker is told at the next tick

    async def tick(self) -> None:
        """One pass: poll states of active jobs, act on them, retry undelivered messages."""
        self.ticks += 1
        now = utcnow()
        work = await open_work(self.sessions, now, CROP_RECOVERY_AGE)
        polled = [job for job in work.active if job.id not in self._inflight]
        states = await self.dispatcher.states([job.id for job in polled]) if polled else {}
        started: list[Job] = []
        progressing: list[tuple[Job, dict[str, Any]]] = []
        for job in polled:
            state = states.get(job.id)
            if state is None:
                continue  # unreadable now (store down or backing off): never a failure
            if state.is_final:
                if self.store_retries.due(job.id):
                    self._spawn(job.id, self._finish(job, state))
                continue
            if self._act_on_timing(job, state, now):
                continue
            if state.state in RUNNING_STATES:
                if job.status == JobStatus.QUEUED.value:
                    started.append(job)
                if isinstance(state.info, dict) and "percent" in state.info:
                    progressing.append((job, state.info))
        self.supervisor.prune(job.id for job in polled if job.status == JobStatus.RUNNING.value)
        if started:
            await self.lifecycle.running([job.id for job in started], now)
        # After the status is recorded, so a member who sees progress never finds the job "queued".
        for job, info in progressing:
            self.delivery.progress(job, info)
        for job in work.crops:
            self._spawn(job.id, self.finish_crop(job.id))
        for job_id in work.undelivered:
            if self.delivery.retry_due(job_id):
                self._spawn(job_id, self.delivery.notify_final(job_id))
        if work.waiting:
            self._spawn_release()

    def _act_on_timing(self, job: Job, state: TaskState, now: Any) -> bool:
        """Time out or recover a job that is not final; True when a handler took it over."""
        action = self.supervisor.judge(job, state, now)
        if action is Action.RECOVER:
            self._spawn(job.id, self._recover(job))
        elif action is not None:
            self._spawn(job.id, self._time_out(job, waited=action is Action.WAIT_TIMEOUT))
        return action is not None

    async def _recover(self, job: Job) -> None:
        """A running job's worker is presumed dead: send it again, or give up after max_resends."""
        if self.supervisor.exhausted(job):
            if await self.dispatcher.revoke(job.id) is False:
                return  # revoke first, refund after: try again at a later tick
            await self._fail(job.id, ErrorCode.ENGINE_ERROR, GAVE_UP)
        elif not await self.supervisor.recover(job):
            return
        await self.jobs.release(job.member_id)
        self.wake()

    async def _store_failed(self, job: Job, exc: Exception) -> bool:
        """Count a failed attempt to store a result; True once the job has been failed for it."""
        delay = self.store_retries.failed(job.id)
        if delay is not None:
            log.warning("job %s: media store failed (%s); retrying in %.1fs", job.id, exc, delay)
            return False
        log.error("job %s: media store kept failing (%s); failing the job", job.id, exc)
        await self._fail(job.id, ErrorCode.STORAGE, STORE_FAILED)
        return True

    # --- outcomes ------------------------------------------------------------------------------------

    async def _fail(self, job_id: str, code: ErrorCode, message: str) -> None:
        if await self.lifecycle.fail(job_id, code, message) is not None:
            await self.delivery.notify_final(job_id)

    async def _finish(self, job: Job, state: TaskState) -> None:
        if state.state == SUCCESS:
            if not await self._finish_success(job, state):
                return  # the media store failed; retried after a pause, the result is kept
        elif state.state == FAILURE:
            failed = JobFailed.from_exception(state.info)
            if failed is not None:  # a job that failed with a reason: its code and member message
                log.info("job %s failed at the worker: %s", job.id, failed.code)
                await self._fail(job.id, failed.error_code, failed.message)
            else:  # the task itself crashed (time limit, lost worker)
                text = str(state.info or "")
                code = ErrorCode.TIMEOUT if "TimeLimit" in text else ErrorCode.ENGINE_ERROR
                log.warning("job %s failed at the worker: %s", job.id, text)
                await self._fail(job.id, code, "The worker stopped with an error.")
        elif state.state == REVOKED:
            await self._fail(job.id, ErrorCode.CANCELLED, "The job was cancelled.")
        await self.dispatcher.forget(job.id)
        await self.jobs.release(job.member_id)
        self.wake()

    async def _finish_success(self, job: Job, state: TaskState) -> bool:
        """Act on a SUCCESS state; False when storing the image failed and will be retried."""
        try:
            outcome = read_outcome(state.info)
        except ResultRejected as exc:
            await self._fail(job.id, exc.code, str(exc))
            return True
        if outcome.error is not None:
            await self._fail(job.id, outcome.error.code, outcome.error.message)
        elif outcome.result is not None:
            try:
                await self._succeed(job, outcome.result)
            except MediaStoreError as exc:
                return await self._store_failed(job, exc)
            self.store_retries.succeeded(job.id)
        elif outcome.describe is not None:
            await self._described(job, outcome.describe)
        else:
            await self._fail(job.id, ErrorCode.ENGINE_ERROR, "The worker returned no images.")
        return True

    async def _time_out(self, job: Job, *, waited: bool) -> None:
        """Revoke a job past its wait or run limit, then (only once revoked) fail and refund it."""
        log.warning("job %s %s too long; revoking", job.id, "waited" if waited else "ran")
        if await self.dispatcher.revoke(job.id) is False:
            return  # the broker did not hear it: a refund now could pay for a job still running
        await self._fail(job.id, ErrorCode.TIMEOUT, timeout_message(self.settings, waited=waited))
        await self.jobs.release(job.member_id)

    async def _succeed(self, job: Job, result: JobResult) -> None:
        """Store a checked result and deliver it; raises ``MediaStoreError`` when it cannot be stored."""
        try:
            image = await asyncio.to_thread(check_result, result, JobKind(job.kind))
        except ResultRejected as exc:
            await self._fail(job.id, exc.code, str(exc))
            return
        if screen(job, result.safety, self.safety_policy) is SafetyAction.BLOCK:
            await self._fail(job.id, ErrorCode.BLOCKED, blocked_detail(result.safety))
            return
        async with self.sessions() as session, session.begin():
            row = await session.get(Job, job.id, with_for_update=True)
            if row is None or JobStatus(row.status).is_final:
                return
            claimed = await self.lifecycle.finish(session, job.id, generation_s=result.timings.generation_s)
            if claimed:
                # A store failure raises here and rolls the claim back with the transaction.
                await self.results.save(session, job.id, image)
                if result.notes:
                    row.params = {**(row.params or {}), NOTES_KEY: list(result.notes)}
                if result.safety:
                    # Kept so delivery spoilers a flagged result and a U# crop is judged by its tile.
                    row.params = {**(row.params or {}), SAFETY_KEY: verdict_payload(result.safety)}
        if claimed:
            timings = result.timings
            log.info(
                "job %s done on %s: generation %.2fs, load %.2fs, encode %.2fs, total %.2fs",
                job.id,
                result.report.model,
                timings.generation_s,
                timings.load_s,
                timings.encode_s,
                timings.total_s,
            )
            await self._completed(job.id)
            await self.delivery.deliver(job.id)

    async def _described(self, job: Job, described: DescribeResult) -> None:
        """Keep /describe's prompt suggestions on the job, mark it done and send them."""
        async with self.sessions() as session, session.begin():
            claimed = await self.lifecycle.finish(session, job.id, generation_s=described.generation_s)
            if claimed:
                await self.results.save_description(session, job.id, described)
        if claimed:
            await self._completed(job.id)
            await self.delivery.deliver(job.id)

    async def _completed(self, job_id: str) -> None:
        """Count a job stored as done (after its commit)."""
        async with self.sessions() as session:
            job = await session.get(Job, job_id)
        if job is None:
            return
        wait = (job.started_at - job.queued_at).total_seconds() if job.started_at and job.queued_at else None
        record_metric("record_completed", job.kind, job.engine, wait, job.generation_s)

    # --- U# crops ----------------------------------------------------------------------------------

    async def run_crop(self, job_id: str) -> None:
        """Finish a crop job now (called by the U# button; the loop recovers orphans)."""
        task = self._spawn(job_id, self.finish_crop(job_id))
        if task is not None:
            await asyncio.shield(task)

    async def _tile_verdicts(self, crop: Job) -> list[SafetyVerdict]:
        """The parent grid's verdict for the tile a U# crop shows (judged in the crop's channel)."""
        async with self.sessions() as session:
            parent = await session.get(Job, crop.parent_id) if crop.parent_id else None
        return tile_verdicts(job_verdicts(parent.params if parent else None), crop.parent_index or 1)

    async def finish_crop(self, job_id: str) -> None:
        """Give a crop job the parent's tile (cut once, then reused) and deliver it. No generation."""
        async with self.sessions() as session:
            job = await session.get(Job, job_id)
        if job is None or job.status != JobStatus.RUNNING.value or not job.parent_id:
            return
        try:
            tile, _data = await self.results.tile(job.parent_id, job.parent_index or 1)
        except (MediaNotFound, ValueError, MediaStoreError) as exc:  # gone, corrupt, or the store is down
            log.warning("crop %s: parent image unavailable (%s)", job_id, exc)
            if isinstance(exc, MediaStoreError):
                await self._fail(job_id, ErrorCode.STORAGE, STORE_DOWN)
            else:
                await self._fail(job_id, ErrorCode.BAD_INPUT, GRID_GONE)
            return
        verdicts = await self._tile_verdicts(job)
        if screen(job, verdicts, self.safety_policy) is SafetyAction.BLOCK:
            await self._fail(job_id, ErrorCode.BLOCKED, blocked_detail(verdicts))
            return
        async with self.sessions() as session, session.begin():
            claimed = await self.lifecycle.finish(session, job_id, generation_s=0.0, crop=True)
            if claimed:
                await self.results.share(session, job_id, tile)
                if verdicts:
                    await self.results.keep_verdicts(session, job_id, verdicts)
        if claimed:
            await self._completed(job_id)
            await self.delivery.deliver(job_id)
