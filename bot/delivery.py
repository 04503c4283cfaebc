"""Delivery: every message a job's member sees after acceptance, in the right order.

"Waiting to start…", the throttled progress edits with a preview, and the final message (the
result with its buttons and notes, or the failure with its refund). Progress and waiting edits
only ever use the interaction token; the final message falls back to the channel
(``bot.sending``). A per-job lock, a "finalised" mark and a check in the database (for a result
another bot process sent) keep a late progress edit from overwriting the result. The final
message is sent by whoever holds the job's delivery claim (``bot.lifecycle``); a failed send
gives the claim back and is retried with a growing delay.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Coroutine
from typing import Any

import discord
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.content_rules import SafetyAction, SafetyPolicy, job_safety_action
from bot.describe_buttons import describe_content, describe_view, described_picture
from bot.lifecycle import Lifecycle
from bot.logconfig import job_context, log_job_end
from bot.models import Job, JobStatus
from bot.render import failure_content, final_content, progress_content, waiting_content
from bot.results import Results
from bot.sending import DEFAULT_FILESIZE_LIMIT, Sender, preview_jpeg, token_alive
from bot.settings import BotSettings
from bot.views import pending_view, result_view
from workers.schema import Engine, JobKind, Progress

log = logging.getLogger(__name__)

MAX_RETRY_DELAY_S = 300.0


async def guarded(job_id: str, coro: Coroutine[Any, Any, Any], *, in_job: bool = True) -> Any:
    """Await a job's handler, logging (not raising) its failure; cancellation still propagates."""
    # Every line this job's handler logs, its failure included, carries its id (bot.logconfig).
    with job_context(job_id if in_job else None):
        try:
            return await coro
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("handling job %s failed", job_id)
            return None


class Delivery:
    """Shows a job's waiting, progress and final messages."""

    def __init__(
        self,
        settings: BotSettings,
        sessions: async_sessionmaker[AsyncSession],
        lifecycle: Lifecycle,
        results: Results,
        sender: Sender,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.lifecycle = lifecycle
        self.results = results
        self.sender = sender
        self._progress_tasks: dict[str, asyncio.Task[Any]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._finalized: set[str] = set()
        self._last_progress: dict[str, tuple[float, int]] = {}
        self._retry_at: dict[str, tuple[float, int]] = {}
        self._limits: dict[str, int] = {}
        self.safety_policy = SafetyPolicy.from_settings(settings)

    async def stop(self) -> None:
        """Wait (bounded) for progress edits in flight, then close the HTTP session."""
        pending = [task for task in self._progress_tasks.values() if not task.done()]
        if pending:
            _done, still = await asyncio.wait(pending, timeout=10)
            for task in still:
                task.cancel()
        await self.sender.close()

    def remember_limit(self, job_id: str, limit: int | None) -> None:
        """The attachment limit Discord announced with the job's interaction."""
        if limit:
            self._limits[job_id] = int(limit)

    def retry_due(self, job_id: str) -> bool:
        """Whether an undelivered job's next send attempt is due (after a failed one, it waits)."""
        due, _attempt = self._retry_at.get(job_id, (0.0, 0))
        return time.monotonic() >= due

    def _lock(self, job_id: str) -> asyncio.Lock:
        lock = self._locks.get(job_id)
        if lock is None:
            lock = self._locks[job_id] = asyncio.Lock()
        return lock

    def _forget(self, job_id: str) -> None:
        self._locks.pop(job_id, None)
        self._last_progress.pop(job_id, None)
        self._limits.pop(job_id, None)
        self._retry_at.pop(job_id, None)
        if len(self._finalized) > 50_000:
            # Only jobs still being tracked need the guard; old entries are safe to drop.
            self._finalized.clear()

    # --- before the result -----------------------------------------------------------------------

    async def show_waiting(self, job: Job, position: int) -> None:
        """Edit the deferred message to "Waiting to start… (position N)"."""
        async with self._lock(job.id):
            if job.id in self._finalized or not token_alive(job):
                return
            try:
                await self.sender.edit_original(
                    job, content=waiting_content(job, position), files=[], view=pending_view(job.id)
                )
            except discord.HTTPException as exc:
                log.info("could not show waiting state of %s: %s", job.id, exc)

    def progress(self, job: Job, info: dict[str, Any]) -> None:
        """Show a worker's progress report, at most once per ``progress_edit_interval_s``."""
        try:
            progress = Progress.model_validate(info)
        except ValidationError:
            return
        last_at, last_percent = self._last_progress.get(job.id, (0.0, -1))
        clock = time.monotonic()
        if progress.percent <= last_percent or clock - last_at < self.settings.progress_edit_interval_s:
            return
        running = self._progress_tasks.get(job.id)
        if running is not None and not running.done():
            return
        self._last_progress[job.id] = (clock, progress.percent)
        task = asyncio.create_task(guarded(job.id, self._show_progress(job, progress)))
        self._progress_tasks[job.id] = task
        task.add_done_callback(lambda done, jid=job.id: self._untrack(jid, done))

    def _untrack(self, job_id: str, done: asyncio.Task[Any]) -> None:
        # Only if it is still this task: a newer one may already have taken the slot.
        if self._progress_tasks.get(job_id) is done:
            del self._progress_tasks[job_id]

    async def _show_progress(self, job: Job, progress: Progress) -> None:
        limit = self._limits.get(job.id, DEFAULT_FILESIZE_LIMIT)
        preview = await asyncio.to_thread(preview_jpeg, progress.preview, limit) if progress.preview else None
        files = [discord.File(io.BytesIO(preview), filename="preview.jpg")] if preview else []
        async with self._lock(job.id):
            if job.id in self._finalized or not token_alive(job):
                return
            # The in-process mark misses a result another bot process delivered: ask the database.
            # Shielded: the final send may cancel this edit, never halfway through a transaction.
            if not await asyncio.shield(self.lifecycle.record_progress(job.id, progress.percent)):
                return
            try:
                await self.sender.edit_original(
                    job,
                    content=progress_content(job, progress.percent),
                    files=files,
                    view=pending_view(job.id),
                )
            except discord.HTTPException as exc:
                log.info("progress edit for %s failed: %s", job.id, exc)

    # --- the final message -----------------------------------------------------------------------

    async def notify_final(self, job_id: str) -> None:
        """Claim and send a final job's message (a failure right after it is recorded, or a retry)."""
        if await self.lifecycle.claim_delivery(job_id):
            await self.deliver(job_id)

    async def deliver(self, job_id: str) -> None:
        """Send a claimed final message; on failure release the claim for a later retry."""
        async with self.sessions() as session:
            job = await session.get(Job, job_id)
        if job is None:
            return
        if job_id not in self._retry_at:
            log_job_end(log, job)  # once per job, not again on each retried send
        try:
            message_id = await self._send_final(job)
        except Exception as exc:
            _due, attempt = self._retry_at.get(job_id, (0.0, 0))
            delay = min(MAX_RETRY_DELAY_S, 2.0 * 2**attempt)
            self._retry_at[job_id] = (time.monotonic() + delay, attempt + 1)
            log.warning("delivery of job %s failed (%s); retrying in %.0fs", job_id, exc, delay)
            await self.lifecycle.release_delivery(job_id)
            return
        await self.lifecycle.delivered(job_id, message_id)
        self._forget(job_id)

    def _failure_content(self, job: Job) -> str:
        """The failure message; the OpenAI engine is suggested only where it is deployed."""
        openai_configured = self.settings.openai_enabled or self.settings.default_engine == Engine.OPENAI
        return failure_content(job, openai_configured=openai_configured)

    async def _send_final(self, job: Job) -> int | None:
        limit = self._limits.get(job.id, DEFAULT_FILESIZE_LIMIT)
        running = self._progress_tasks.get(job.id)
        if running is not None and not running.done():
            # A progress edit in flight holds the job's lock, and discord.py sleeps out a 429 or
            # a 5xx inside it (up to five tries): a stale percentage must not hold back the result.
            running.cancel()
        async with self._lock(job.id):
            self._finalized.add(job.id)
            if job.status != JobStatus.DONE.value:
                return await self.sender.send_final(
                    job, content=self._failure_content(job), image=None, view=None, limit=limit
                )
            if job.kind == JobKind.DESCRIBE.value:
                # The member's picture with the numbered prompts and their buttons under it.
                picture = await described_picture(self.sessions, self.results.store, job.id)
                return await self.sender.send_final(
                    job, content=describe_content(job), image=picture, view=describe_view(job), limit=limit
                )
            main = await self.results.image(job.id, 0)  # MediaNotFound: retried later, then logged
            data = await self.results.store.get(main.key)
            view = result_view(job, main.width, main.height, public_url=self.settings.public_url)
            ext = main.key.rsplit(".", 1)[-1] if "." in main.key else "png"
            # A flagged result that was not blocked is posted behind Discord's spoiler blur.
            spoiler = job_safety_action(job.params, self.safety_policy) is SafetyAction.SPOILER
            return await self.sender.send_final(
                job, content=final_content(job), image=(data, ext), view=view, limit=limit, spoiler=spoiler
            )
