"""Where a job's progress goes: the task's PROGRESS state in the result backend.

No torch here: plain Celery/result-backend plumbing, shared by the SDXL and OpenAI tasks. Its
counterpart, whether to stop, is ``workers.cancellation.CancelCheck``; the heartbeat that keeps
the state fresh between reports is ``workers.heartbeat.Heartbeat``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from workers.schema import Progress

log = logging.getLogger(__name__)

PROGRESS_STATE = "PROGRESS"  # the custom Celery state the bot reads with AsyncResult(job_id).info


class ProgressSink:
    """Stores each ``Progress`` as the task's PROGRESS state, for ``AsyncResult(job_id).info``.

    The engines throttle their reports (``progress_report_interval_s``); this sink only drops reports
    that arrive faster than ``min_interval_s`` apart, a guard for an engine that does not, and it
    always lets the first report and 100 % through.

    Every stored report carries ``worker`` (this node's name) and ``heartbeat_at`` (unix seconds,
    when it was stored); :meth:`beat` stores the last report again with a fresh ``heartbeat_at``.
    After :meth:`close` nothing is stored any more, so a heartbeat can never overwrite the task's
    final state.

    It writes with ``backend.store_result`` and no request, unlike ``Task.update_state``: with
    ``result_extended`` the latter re-stores the task's arguments (the base64 input image) with
    every report, megabytes per update for an upscale.
    """

    def __init__(
        self,
        task: Any,
        job_id: str,
        min_interval_s: float = 0.0,
        *,
        worker: str | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """Report for ``job_id`` through ``task``'s result backend, as node ``worker``."""
        self._backend = task.backend
        self._job_id = job_id
        self._min_interval_s = min_interval_s
        self._worker = worker
        self._wall_clock = wall_clock
        self._last: float | None = None
        self._latest = Progress(job_id=job_id, percent=0)
        self._lock = threading.Lock()  # the OpenAI engine reports from several threads
        # Held while storing, so close() waits for a store in flight (the heartbeat's thread).
        self._store_lock = threading.Lock()
        self._closed = False
        self.reports = 0
        self.beats = 0

    def __call__(self, progress: Progress) -> None:
        """Store one report; failures are logged, never raised (progress is cosmetic)."""
        now = time.monotonic()
        with self._lock:
            throttled = (
                self._last is not None and progress.percent < 100 and now - self._last < self._min_interval_s
            )
            if throttled:
                return
            self._last = now
            self._latest = progress
            self.reports += 1
        self._store(progress)

    def beat(self) -> None:
        """Store the latest report again with a fresh ``heartbeat_at`` (0 % before any report)."""
        with self._lock:
            latest = self._latest
            self.beats += 1
        self._store(latest)

    def close(self) -> None:
        """Store nothing from now on; returns once a store in flight has finished."""
        with self._store_lock:
            self._closed = True

    def _store(self, progress: Progress) -> None:
        with self._store_lock:
            if self._closed:
                return
            stamped = progress.model_copy(update={"worker": self._worker, "heartbeat_at": self._wall_clock()})
            try:
                self._backend.store_result(self._job_id, stamped.model_dump(mode="json"), PROGRESS_STATE)
            except SoftTimeLimitExceeded:  # the time limit's signal can land here: let it stop the job
                raise
            except Exception:
                log.warning("could not store progress for job %s", self._job_id, exc_info=True)
