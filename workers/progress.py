"""Where a job's progress goes: the task's PROGRESS state in the result backend.

No torch here: plain Celery/result-backend plumbing, shared by the SDXL and OpenAI tasks. Its
counterpart, whether to stop, is ``workers.cancellation.CancelCheck``.
"""

from __future__ import annotations

import logging
import threading
import time
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

    It writes with ``backend.store_result`` and no request, unlike ``Task.update_state``: with
    ``result_extended`` the latter re-stores the task's arguments (the base64 input image) with
    every report, megabytes per update for an upscale.
    """

    def __init__(self, task: Any, job_id: str, min_interval_s: float = 0.0) -> None:
        """Report for ``job_id`` through ``task``'s result backend."""
        self._backend = task.backend
        self._job_id = job_id
        self._min_interval_s = min_interval_s
        self._last: float | None = None
        self._lock = threading.Lock()  # the OpenAI engine reports from several threads
        self.reports = 0

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
            self.reports += 1
        try:
            self._backend.store_result(self._job_id, progress.model_dump(mode="json"), PROGRESS_STATE)
        except SoftTimeLimitExceeded:  # the time limit's signal can land here: let it stop the job
            raise
        except Exception:
            log.warning("could not store progress for job %s", self._job_id, exc_info=True)
