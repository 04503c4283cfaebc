"""Delivery: follow jobs at the broker, show progress, deliver results, refund failures.

A background *tracker* polls the result backend for every queued or running job (one batch per
tick, in the dispatcher's thread pool because Celery's result API blocks). For each job it:

- marks it running once a worker reports STARTED/PROGRESS, and edits the member's message with
  the percentage and a low-resolution preview, at most once per ``progress_interval_s``;
- on SUCCESS stores the images (index 0 = grid or single image, 1-4 = tiles), marks the job done
  *and* claims delivery (``delivered``) in one transaction, then sends the result;
- on an error outcome, a Celery FAILURE/REVOKED, or a job older than ``job_timeout_s``, marks it
  failed and refunds it in one transaction (refund is exactly-once by the ledger's unique key),
  then tells the member why.

Messages go to the interaction's original response (the deferred "thinking…" message) with the
interaction token while it is alive; after its 15 minutes, or when Discord says it is gone
(10062 unknown interaction, 50027 invalid webhook token), final messages go to the channel with
the bot token, mentioning the member. Progress edits are never sent to the channel.

Nothing is lost across restarts: everything the tracker needs is in the database, so a new bot
process resumes queued/running jobs, re-sends undelivered results (``delivered`` false on a
final job: the claim is released again when sending failed) and dispatches waiting jobs.
A crash between committing the claim and recording the sent message's id is healed at the next
start: such claims are released and sent again (an edit of the same interaction message while
its token lives, so no duplicate in the common case).
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import re
import time
from collections.abc import Coroutine, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import aiohttp
import discord
from discord.http import handle_message_parameters
from discord.utils import MISSING
from discord.webhook.async_ import async_context
from PIL import Image as PILImage
from pydantic import ValidationError
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.dispatch import FAILURE, REVOKED, RUNNING_STATES, SUCCESS, Dispatcher, TaskState
from bot.jobs import ACTIVE_STATUSES, JobService, Operation, grid_count, record_metric
from bot.logconfig import job_context
from bot.models import Image, Job, JobStatus, utcnow
from bot.settings import BotSettings
from bot.storage import MediaNotFound, MediaStore, save_job_images
from workers.imaging import compose_grid, decode_image, encode_png, encode_under, split_grid
from workers.schema import ErrorCode, JobKind, Progress, TaskOutcome, WorkerError, b64decode_text

if TYPE_CHECKING:
    from bot.client import MirageBot

log = logging.getLogger(__name__)

TOKEN_LIFETIME = timedelta(minutes=15)
# Stop using the interaction token a little before Discord does: an edit in flight at 15:00
# would fail anyway and cost a round trip before the channel fallback.
TOKEN_MARGIN = timedelta(seconds=30)
DEFAULT_FILESIZE_LIMIT = 10 * 1024 * 1024
# Discord error codes that mean "this interaction/webhook can no longer be used".
DEAD_TOKEN_CODES = frozenset({10062, 50027, 10015, 10008})
TOO_LARGE_CODE = 40005
MAX_SEND_ATTEMPTS = 8
MIN_ATTACHMENT_BYTES = 1024
PREVIEW_SIDE = 256
MAX_PROMPT_SHOWN = 1500
UNDELIVERED_LOOKBACK = timedelta(days=1)
CROP_RECOVERY_AGE = timedelta(seconds=30)  # a crop "running" longer than this was orphaned

FAILURE_REASONS: dict[ErrorCode, str] = {
    ErrorCode.CONTENT_POLICY: "The image service rejected this prompt under its content policy.",
    ErrorCode.BAD_INPUT: "The input image could not be used (it may be corrupt or missing).",
    ErrorCode.ENGINE_UNAVAILABLE: "The image engine is not available right now. Try again later or "
    "pick another engine in /settings.",
    ErrorCode.ENGINE_ERROR: "The image engine failed while making this image.",
    ErrorCode.TIMEOUT: "This job took too long and was stopped.",
    ErrorCode.CANCELLED: "This job was cancelled.",
}

# --- rendering -------------------------------------------------------------------------------


def shown_prompt(job: Job) -> str:
    """The prompt as shown in a message: markdown-escaped and bounded."""
    text = job.prompt or ""
    if len(text) > MAX_PROMPT_SHOWN:
        text = text[: MAX_PROMPT_SHOWN - 1] + "…"
    return discord.utils.escape_markdown(text)


def job_head(job: Job) -> str:
    """``**prompt** - <what> by <@user>`` like Midjourney's messages."""
    kind = JobKind(job.kind)
    op = Operation.from_job(job)
    mention = f"<@{job.user_id}>"
    prompt = f"**{shown_prompt(job)}**"
    if kind in (JobKind.IMAGINE, JobKind.REROLL):
        return f"{prompt} - {mention}"
    if kind == JobKind.CROP:
        return f"{prompt} - Image #{job.parent_index or 1} {mention}"
    if kind == JobKind.VARIATION:
        what = "Variations (Subtle)" if (op.strength or 0.85) < 0.7 else "Variations (Strong)"
    elif kind == JobKind.UPSCALE:
        what = "Upscaled (Subtle)" if (op.strength or 0.35) < 0.45 else "Upscaled (Creative)"
    elif kind == JobKind.ZOOM:
        what = f"Zoom Out {op.scale:g}x" if op.scale else "Zoom Out"
    elif kind == JobKind.PAN:
        what = f"Pan {op.direction.value.capitalize()}" if op.direction else "Pan"
    else:
        what = "Make Square"
    return f"{prompt} - {what} by {mention}"


def mode_suffix(job: Job) -> str:
    """``(fast/public)`` or ``(fast/stealth)``."""
    return f"(fast/{job.visibility})"


def waiting_content(job: Job, position: int) -> str:
    """The message while a job waits for a worker."""
    return f"{job_head(job)} Waiting to start… (position {position})"


def progress_content(job: Job, percent: int) -> str:
    """The message while a job runs."""
    return f"{job_head(job)} ({percent}%) {mode_suffix(job)}"


def final_content(job: Job) -> str:
    """The message carrying the result."""
    return f"{job_head(job)} {mode_suffix(job)}"


def failure_content(job: Job) -> str:
    """The message for a failed job: why, and that the credits came back."""
    try:
        code = ErrorCode(job.error_code) if job.error_code else ErrorCode.ENGINE_ERROR
    except ValueError:
        code = ErrorCode.ENGINE_ERROR
    lines = [f"{job_head(job)} ❌ {FAILURE_REASONS[code]}"]
    detail = (job.error or "").strip()
    if detail and code in (ErrorCode.CONTENT_POLICY, ErrorCode.BAD_INPUT, ErrorCode.ENGINE_UNAVAILABLE):
        lines.append(f"> {discord.utils.escape_markdown(detail[:300])}")
    if job.cost:
        plural = job.cost != 1
        lines.append(f"Your {job.cost} credit{'s' if plural else ''} {'were' if plural else 'was'} refunded.")
    return "\n".join(lines)


def file_stem(job: Job) -> str:
    """A readable, safe file name stem: a few prompt words and the job id."""
    words = re.findall(r"[a-z0-9]+", (job.prompt or "").lower())
    slug = "_".join(words)[:40].strip("_") or "mirage"
    return f"{slug}_{job.id}"


def allowed_mentions_for(job: Job) -> discord.AllowedMentions:
    """Only the job's owner may be pinged, never roles or @everyone from a prompt."""
    return discord.AllowedMentions(everyone=False, roles=False, users=[discord.Object(job.user_id)])


# --- image helpers (run in threads) ----------------------------------------------------------


def _result_files(images: Sequence[str], count: int) -> list[tuple[int, bytes]]:
    """Worker images (base64 PNG) to the stored set: grid + tiles, or the single image."""
    decoded = [decode_image(b64decode_text(data)) for data in images]
    if count == 1:
        return [(0, encode_png(decoded[0]))]
    grid = compose_grid(decoded)
    return [(0, encode_png(grid))] + [(i + 1, encode_png(tile)) for i, tile in enumerate(decoded)]


def _crop_tile(grid_bytes: bytes, index: int) -> bytes:
    tiles = split_grid(decode_image(grid_bytes))
    return encode_png(tiles[index - 1])


def _fit(data: bytes, limit: int, ext: str) -> tuple[bytes, str]:
    """The stored bytes if they fit the upload limit, else a re-encoded smaller version."""
    if len(data) <= limit:
        return data, ext
    return encode_under(decode_image(data), limit)


def _preview_jpeg(preview_b64: str, limit: int) -> bytes | None:
    """A small JPEG of the worker's preview, or None if it is unreadable or cannot fit ``limit``.

    The preview is a courtesy: it is shrunk to at most PREVIEW_SIDE pixels and simply left out
    rather than re-encoded at length when the upload limit is tiny.
    """
    try:
        raw = base64.b64decode(preview_b64, validate=True)
        with PILImage.open(io.BytesIO(raw)) as img:
            img.load()
            small = img.convert("RGB")
        small.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
        out = io.BytesIO()
        small.save(out, "JPEG", quality=60)
    except Exception:
        return None
    data = out.getvalue()
    return data if len(data) <= limit else None


class DiscordError(Exception):
    """Sending failed in a way worth retrying later (Discord down, rate limited hard)."""


class DeliveryService:
    """The tracker loop and every message the bot sends about a job."""

    def __init__(
        self,
        bot: MirageBot,
        settings: BotSettings,
        sessions: async_sessionmaker[AsyncSession],
        store: MediaStore,
        dispatcher: Dispatcher,
        jobs: JobService,
        *,
        poll_interval: float = 0.5,
    ) -> None:
        self.bot = bot
        self.settings = settings
        self.sessions = sessions
        self.store = store
        self.dispatcher = dispatcher
        self.jobs = jobs
        self.poll_interval = poll_interval
        jobs.on_failed = self.notify_final
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._inflight: dict[str, asyncio.Task[Any]] = {}
        self._progress_tasks: dict[str, asyncio.Task[Any]] = {}
        self._release_task: asyncio.Task[Any] | None = None
        self._msg_locks: dict[str, asyncio.Lock] = {}
        self._finalized: set[str] = set()
        self._last_progress: dict[str, tuple[float, int]] = {}
        self._retry_at: dict[str, tuple[float, int]] = {}
        self._limits: dict[str, int] = {}
        self.ticks = 0

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the tracker (idempotent)."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="mirage-tracker")

    async def stop(self) -> None:
        """Stop the tracker and wait for in-flight deliveries (bounded)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
        pending = [t for t in (*self._inflight.values(), *self._progress_tasks.values()) if not t.done()]
        if self._release_task and not self._release_task.done():
            pending.append(self._release_task)
        if pending:
            _done, still = await asyncio.wait(pending, timeout=10)
            for task in still:
                task.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def wake(self) -> None:
        """Run the next tick now (a job was created or finished)."""
        self._wake.set()

    def remember_limit(self, job_id: str, limit: int | None) -> None:
        """The attachment limit Discord announced with the job's interaction."""
        if limit:
            self._limits[job_id] = int(limit)

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
                    Job.status.in_((JobStatus.DONE.value, JobStatus.FAILED.value, JobStatus.CANCELLED.value)),
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

    async def _run(self) -> None:
        log.info("tracker started (poll every %.2fs)", self.poll_interval)
        try:
            await self.reclaim_interrupted()
        except Exception:
            log.exception("could not reclaim interrupted deliveries")
        self._spawn_release()
        while True:
            # Cleared before the tick, so a wake() during the tick triggers the next one at once.
            self._wake.clear()
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("tracker tick failed")
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.poll_interval)
            except TimeoutError:
                pass

    def _spawn(self, job_id: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any] | None:
        """Run a job's handler unless one is already running for it."""
        current = self._inflight.get(job_id)
        if current is not None and not current.done():
            coro.close()
            return None
        task = asyncio.create_task(self._guard(job_id, coro), name=f"job-{job_id}")
        self._inflight[job_id] = task
        task.add_done_callback(lambda done, jid=job_id: self._untrack(self._inflight, jid, done))
        return task

    @staticmethod
    def _untrack(tasks: dict[str, asyncio.Task[Any]], job_id: str, done: asyncio.Task[Any]) -> None:
        # Only if it is still this task: a newer one may already have taken the slot.
        if tasks.get(job_id) is done:
            del tasks[job_id]

    @staticmethod
    async def _guard(job_id: str, coro: Coroutine[Any, Any, Any], *, in_job: bool = True) -> Any:
        # Every line this job's handler logs, its failure included, carries its id (bot.logconfig).
        with job_context(job_id if in_job else None):
            try:
                return await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("handling job %s failed", job_id)
                return None

    def _spawn_release(self) -> None:
        if self._release_task is None or self._release_task.done():
            self._release_task = asyncio.create_task(
                self._guard("release", self.jobs.release_all(), in_job=False)
            )

    # --- the tick ----------------------------------------------------------------------------

    async def tick(self) -> None:
        """One pass: poll states of active jobs, act on them, retry undelivered messages."""
        self.ticks += 1
        now = utcnow()
        async with self.sessions() as session:
            active = (
                await session.scalars(
                    select(Job).where(Job.status.in_(ACTIVE_STATUSES), Job.kind != JobKind.CROP.value)
                )
            ).all()
            orphan_crops = (
                await session.scalars(
                    select(Job).where(
                        Job.status == JobStatus.RUNNING.value,
                        Job.kind == JobKind.CROP.value,
                        Job.created_at < now - CROP_RECOVERY_AGE,
                    )
                )
            ).all()
            undelivered = (
                await session.scalars(
                    select(Job).where(
                        Job.status.in_(
                            (JobStatus.DONE.value, JobStatus.FAILED.value, JobStatus.CANCELLED.value)
                        ),
                        Job.delivered.is_(False),
                        Job.finished_at > now - UNDELIVERED_LOOKBACK,
                    )
                )
            ).all()
            has_waiting = (
                await session.scalar(select(Job.id).where(Job.status == JobStatus.WAITING.value).limit(1))
            ) is not None

        polled = [job for job in active if job.id not in self._inflight]
        states = await self.dispatcher.states([job.id for job in polled]) if polled else {}
        started: list[str] = []
        progressing: list[tuple[Job, dict[str, Any]]] = []
        timeout = timedelta(seconds=self.settings.job_timeout_s)
        for job in polled:
            state = states.get(job.id)
            if state is None:
                continue
            if state.is_final:
                self._spawn(job.id, self._finish(job, state))
                continue
            since = job.queued_at or job.created_at
            if since is not None and now - since > timeout:
                self._spawn(job.id, self._time_out(job))
                continue
            if state.state in RUNNING_STATES:
                if job.status == JobStatus.QUEUED.value:
                    started.append(job.id)
                    job.status = JobStatus.RUNNING.value
                if isinstance(state.info, dict) and "percent" in state.info:
                    progressing.append((job, state.info))
        if started:
            async with self.sessions() as session, session.begin():
                await session.execute(
                    update(Job)
                    .where(Job.id.in_(started), Job.status == JobStatus.QUEUED.value)
                    .values(status=JobStatus.RUNNING.value, started_at=now)
                )
        # After the status is recorded, so a member who sees progress never finds the job "queued".
        for job, info in progressing:
            self._maybe_progress(job, info)
        for job in orphan_crops:
            self._spawn(job.id, self.finish_crop(job.id))
        clock = time.monotonic()
        for job in undelivered:
            due, _attempt = self._retry_at.get(job.id, (0.0, 0))
            if clock >= due:
                self._spawn(job.id, self.notify_final(job.id))
        if has_waiting:
            self._spawn_release()

    # --- outcomes ----------------------------------------------------------------------------

    async def _finish(self, job: Job, state: TaskState) -> None:
        if state.state == SUCCESS:
            try:
                outcome = TaskOutcome.model_validate(state.info)
            except ValidationError:
                log.error("job %s returned an unreadable outcome", job.id)
                await self.jobs.fail(
                    job.id, ErrorCode.ENGINE_ERROR, "The worker returned an unreadable result."
                )
            else:
                if outcome.error is not None:
                    await self.jobs.fail(job.id, outcome.error.code, outcome.error.message)
                elif outcome.result is not None:
                    await self._succeed(job, outcome)
                else:
                    await self.jobs.fail(job.id, ErrorCode.ENGINE_ERROR, "The worker returned no images.")
        elif state.state == FAILURE:
            text = str(state.info or "")
            code = ErrorCode.TIMEOUT if "TimeLimit" in text else ErrorCode.ENGINE_ERROR
            log.warning("job %s failed at the worker: %s", job.id, text)
            await self.jobs.fail(job.id, code, "The worker stopped with an error.")
        elif state.state == REVOKED:
            await self.jobs.fail(job.id, ErrorCode.CANCELLED, "The job was cancelled.")
        await self.dispatcher.forget(job.id)
        await self.jobs.release(job.member_id)
        self.wake()

    async def _time_out(self, job: Job) -> None:
        log.warning("job %s exceeded %ss; revoking", job.id, self.settings.job_timeout_s)
        await self.dispatcher.revoke(job.id)
        minutes = max(1, round(self.settings.job_timeout_s / 60))
        await self.jobs.fail(job.id, ErrorCode.TIMEOUT, f"The job took longer than {minutes} minutes.")
        await self.jobs.release(job.member_id)

    async def _succeed(self, job: Job, outcome: TaskOutcome) -> None:
        assert outcome.result is not None
        count = grid_count(JobKind(job.kind))
        images = [image.data for image in outcome.result.images]
        if len(images) != count:
            await self.jobs.fail(job.id, ErrorCode.ENGINE_ERROR, f"The engine returned {len(images)} images.")
            return
        try:
            files = await asyncio.to_thread(_result_files, images, count)
        except (WorkerError, ValueError) as exc:
            log.error("job %s returned unusable images: %s", job.id, exc)
            await self.jobs.fail(job.id, ErrorCode.ENGINE_ERROR, "The engine returned unusable images.")
            return
        info = outcome.result.info or {}
        generation_s = info.get("generation_s") or info.get("seconds")
        if await self._store_and_claim(job.id, files, generation_s=generation_s):
            await self._completed(job.id)
            await self._deliver(job.id)

    async def _store_and_claim(
        self, job_id: str, files: list[tuple[int, bytes]], *, generation_s: Any = None
    ) -> bool:
        """Save images, mark done and claim delivery in one transaction; False if already final."""
        async with self.sessions() as session, session.begin():
            job = await session.get(Job, job_id, with_for_update=True)
            if job is None or JobStatus(job.status).is_final:
                return False
            await save_job_images(self.store, session, job, files, keep_metadata=self.settings.keep_metadata)
            now = utcnow()
            values: dict[str, Any] = {
                "status": JobStatus.DONE.value,
                "delivered": True,
                "progress": 100,
                "finished_at": now,
                "error": None,
                "error_code": None,
            }
            if job.started_at is None:
                values["started_at"] = job.queued_at or now
            if isinstance(generation_s, int | float):
                values["generation_s"] = float(generation_s)
            elif job.started_at is not None:
                values["generation_s"] = (now - job.started_at).total_seconds()
            result = await session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status.in_(ACTIVE_STATUSES), Job.delivered.is_(False))
                .values(**values)
                .returning(Job.id)
            )
            return result.scalar_one_or_none() is not None

    async def _completed(self, job_id: str) -> None:
        """Count a job stored as done (after its commit)."""
        async with self.sessions() as session:
            job = await session.get(Job, job_id)
        if job is None:
            return
        wait = (job.started_at - job.queued_at).total_seconds() if job.started_at and job.queued_at else None
        record_metric("record_completed", job.kind, job.engine, wait, job.generation_s)

    # --- U# crops ----------------------------------------------------------------------------

    async def run_crop(self, job_id: str) -> None:
        """Finish a crop job now (called by the U# button; the tracker recovers orphans)."""
        task = self._spawn(job_id, self.finish_crop(job_id))
        if task is not None:
            await asyncio.shield(task)

    async def finish_crop(self, job_id: str) -> None:
        """Cut tile N out of the parent's stored grid, store it and deliver it. No generation."""
        async with self.sessions() as session:
            job = await session.get(Job, job_id)
            if job is None or job.status != JobStatus.RUNNING.value:
                return
            parent_id, index = job.parent_id, job.parent_index or 1
            rows = (
                (await session.scalars(select(Image).where(Image.job_id == parent_id))).all()
                if parent_id
                else []
            )
        by_index = {row.index: row for row in rows}
        try:
            if index in by_index:
                tile = await self.store.get(by_index[index].key)
            elif 0 in by_index:
                grid = await self.store.get(by_index[0].key)
                tile = await asyncio.to_thread(_crop_tile, grid, index)
            else:
                raise MediaNotFound(f"{parent_id}/0")
            # Storing re-encodes the tile, which is where a stored tile that is not an image fails.
            claimed = await self._store_and_claim_crop(job_id, tile)
        except (MediaNotFound, WorkerError, ValueError) as exc:
            log.warning("crop %s: parent image unavailable (%s)", job_id, exc)
            await self.jobs.fail(
                job_id, ErrorCode.BAD_INPUT, "The grid this image comes from is no longer available."
            )
            return
        if claimed:
            await self._completed(job_id)
            await self._deliver(job_id)

    async def _store_and_claim_crop(self, job_id: str, tile: bytes) -> bool:
        async with self.sessions() as session, session.begin():
            job = await session.get(Job, job_id, with_for_update=True)
            if job is None or job.status != JobStatus.RUNNING.value:
                return False
            await save_job_images(
                self.store, session, job, [(0, tile)], keep_metadata=self.settings.keep_metadata
            )
            now = utcnow()
            result = await session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.RUNNING.value, Job.delivered.is_(False))
                .values(
                    status=JobStatus.DONE.value,
                    delivered=True,
                    progress=100,
                    started_at=now,
                    finished_at=now,
                    generation_s=0.0,
                )
                .returning(Job.id)
            )
            return result.scalar_one_or_none() is not None

    # --- messages ----------------------------------------------------------------------------

    def _lock(self, job_id: str) -> asyncio.Lock:
        lock = self._msg_locks.get(job_id)
        if lock is None:
            lock = self._msg_locks[job_id] = asyncio.Lock()
        return lock

    def _forget_job(self, job_id: str) -> None:
        self._msg_locks.pop(job_id, None)
        self._last_progress.pop(job_id, None)
        self._limits.pop(job_id, None)
        self._retry_at.pop(job_id, None)
        if len(self._finalized) > 50_000:
            # Only jobs still being tracked need the guard; old entries are safe to drop.
            self._finalized.clear()

    def token_alive(self, job: Job) -> bool:
        """Whether the job's interaction token can still edit its message."""
        if not job.interaction_token or not job.application_id or job.created_at is None:
            return False
        return utcnow() - job.created_at < TOKEN_LIFETIME - TOKEN_MARGIN

    async def show_waiting(self, job: Job, position: int) -> None:
        """Edit the deferred message to "Waiting to start… (position N)"."""
        async with self._lock(job.id):
            if job.id in self._finalized or not self.token_alive(job):
                return
            try:
                await self._edit_original(job, content=waiting_content(job, position), files=[], view=None)
            except discord.HTTPException as exc:
                log.info("could not show waiting state of %s: %s", job.id, exc)

    def _maybe_progress(self, job: Job, info: dict[str, Any]) -> None:
        try:
            progress = Progress.model_validate(info)
        except ValidationError:
            return
        last_at, last_percent = self._last_progress.get(job.id, (0.0, -1))
        clock = time.monotonic()
        if progress.percent <= last_percent or clock - last_at < self.settings.progress_interval_s:
            return
        running = self._progress_tasks.get(job.id)
        if running is not None and not running.done():
            return
        self._last_progress[job.id] = (clock, progress.percent)
        task = asyncio.create_task(self._guard(job.id, self._show_progress(job, progress)))
        self._progress_tasks[job.id] = task
        task.add_done_callback(lambda done, jid=job.id: self._untrack(self._progress_tasks, jid, done))

    async def _show_progress(self, job: Job, progress: Progress) -> None:
        limit = self._limits.get(job.id, DEFAULT_FILESIZE_LIMIT)
        preview = (
            await asyncio.to_thread(_preview_jpeg, progress.preview, limit) if progress.preview else None
        )
        files = [discord.File(io.BytesIO(preview), filename="preview.jpg")] if preview else []
        async with self._lock(job.id):
            if job.id in self._finalized or not self.token_alive(job):
                return
            try:
                await self._edit_original(
                    job, content=progress_content(job, progress.percent), files=files, view=None
                )
            except discord.HTTPException as exc:
                log.info("progress edit for %s failed: %s", job.id, exc)
        async with self.sessions() as session, session.begin():
            await session.execute(
                update(Job)
                .where(Job.id == job.id, Job.progress < progress.percent)
                .values(progress=progress.percent)
            )

    async def notify_final(self, job_id: str) -> None:
        """Deliver whatever a final job needs: its result, or the failure message.

        Used for failures right after they are recorded and by the tracker for jobs whose
        delivery is still pending (``delivered`` false), e.g. after a restart.
        """
        async with self.sessions() as session, session.begin():
            result = await session.execute(
                update(Job)
                .where(
                    Job.id == job_id,
                    Job.status.in_((JobStatus.DONE.value, JobStatus.FAILED.value, JobStatus.CANCELLED.value)),
                    Job.delivered.is_(False),
                )
                .values(delivered=True)
                .returning(Job.id)
            )
            claimed = result.scalar_one_or_none() is not None
        if claimed:
            await self._deliver(job_id)

    async def _deliver(self, job_id: str) -> None:
        """Send a claimed final message; on failure release the claim for a later retry."""
        async with self.sessions() as session:
            job = await session.get(Job, job_id)
            if job is None:
                return
            images = (await session.scalars(select(Image).where(Image.job_id == job_id))).all()
        try:
            message_id = await self._send_final(job, list(images))
        except Exception as exc:
            _due, attempt = self._retry_at.get(job_id, (0.0, 0))
            delay = min(300.0, 2.0 * 2**attempt)
            self._retry_at[job_id] = (time.monotonic() + delay, attempt + 1)
            log.warning("delivery of job %s failed (%s); retrying in %.0fs", job_id, exc, delay)
            async with self.sessions() as session, session.begin():
                await session.execute(update(Job).where(Job.id == job_id).values(delivered=False))
            return
        async with self.sessions() as session, session.begin():
            await session.execute(update(Job).where(Job.id == job_id).values(message_id=message_id))
        self._forget_job(job_id)

    async def _send_final(self, job: Job, images: list[Image]) -> int | None:
        from bot.buttons import result_view  # buttons import this module's helpers

        async with self._lock(job.id):
            self._finalized.add(job.id)
            if job.status != JobStatus.DONE.value:
                return await self._send(job, content=failure_content(job), image=None, view=None)
            main = next((image for image in images if image.index == 0), None)
            if main is None:
                raise MediaNotFound(f"{job.id}/0")
            data = await self.store.get(main.key)
            view = result_view(job, main.width, main.height)
            ext = main.key.rsplit(".", 1)[-1] if "." in main.key else "png"
            return await self._send(job, content=final_content(job), image=(data, ext), view=view)

    async def _send(
        self,
        job: Job,
        *,
        content: str,
        image: tuple[bytes, str] | None,
        view: discord.ui.View | None,
    ) -> int | None:
        """Final message: edit the original response, else post to the channel with a mention.

        Attachments larger than the limit are re-encoded; a 40005 "too large" answer halves the
        limit and tries again, so an image is never dropped.
        """
        limit = self._limits.get(job.id, DEFAULT_FILESIZE_LIMIT)
        use_token = self.token_alive(job)
        sent_size = 0
        for _attempt in range(MAX_SEND_ATTEMPTS):
            files: list[discord.File] = []
            if image is not None:
                data, ext = await asyncio.to_thread(_fit, image[0], limit, image[1])
                sent_size = len(data)
                files = [discord.File(io.BytesIO(data), filename=f"{file_stem(job)}.{ext}")]
            try:
                if use_token:
                    return await self._edit_original(job, content=content, files=files, view=view)
                return await self._send_channel(job, content=content, files=files, view=view)
            except discord.HTTPException as exc:
                if (exc.code == TOO_LARGE_CODE or exc.status == 413) and image is not None:
                    # The real limit is below what we sent (a restart forgot the interaction's
                    # limit, or the server's changed): aim at half of the rejected size.
                    limit = max(MIN_ATTACHMENT_BYTES, min(limit, sent_size) // 2)
                    log.info("attachment for %s too large; re-encoding under %d bytes", job.id, limit)
                    continue
                if use_token and (exc.code in DEAD_TOKEN_CODES or exc.status in (401, 404)):
                    log.info("interaction token of %s is gone (%s); posting to the channel", job.id, exc.code)
                    use_token = False
                    continue
                raise
        raise DiscordError(f"could not deliver job {job.id}")

    async def _edit_original(
        self,
        job: Job,
        *,
        content: str,
        files: list[discord.File],
        view: discord.ui.View | None,
    ) -> int:
        """PATCH the interaction's original response with the stored token.

        Goes through discord.py's webhook adapter (rate limits and multipart included); the bot
        keeps no Interaction object across restarts, only the application id and token.
        """
        assert job.application_id is not None and job.interaction_token is not None
        if self._session is None:
            self._session = aiohttp.ClientSession()
        with handle_message_parameters(
            content=content,
            attachments=files,
            view=view,
            allowed_mentions=allowed_mentions_for(job),
        ) as params:
            data = await async_context.get().edit_original_interaction_response(
                job.application_id,
                job.interaction_token,
                session=self._session,
                payload=params.payload,
                multipart=params.multipart,
                files=params.files,
            )
        return int(data["id"]) if isinstance(data, dict) and "id" in data else 0

    async def _send_channel(
        self,
        job: Job,
        *,
        content: str,
        files: list[discord.File],
        view: discord.ui.View | None,
    ) -> int:
        """POST the message to the job's channel with the bot token, mentioning the member."""
        channel = self.bot.get_partial_messageable(job.channel_id, guild_id=job.guild_id or None)
        if f"<@{job.user_id}>" not in content:
            content = f"<@{job.user_id}> {content}"
        message = await channel.send(
            content=content,
            files=files or MISSING,
            view=view if view is not None else MISSING,
            allowed_mentions=allowed_mentions_for(job),
        )
        return message.id
