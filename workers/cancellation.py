"""Cancelling a running job: the bot revokes the task id; the engine polls ``CancelCheck``.

Celery's plain ``revoke`` only reaches the worker's main process (its revoked set). With the
prefork pool the job runs in a child with its own, reset copy of that set, so the main process
relays: :class:`CancelRelay`, a worker bootstep, writes a flag file per revoked running job into
a folder the children learn from ``MIRAGE_CANCEL_DIR`` (set before they are forked), and
:class:`CancelCheck` in the child looks for it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from celery import bootsteps

log = logging.getLogger(__name__)

ENV_CANCEL_DIR = "MIRAGE_CANCEL_DIR"
CANCEL_DIR_PREFIX = "mirage-cancel-"


def cancel_dir() -> Path | None:
    """This worker's flag folder (inherited by its children), or None outside a worker."""
    folder = os.environ.get(ENV_CANCEL_DIR)
    return Path(folder) if folder else None


def cancel_flag(job_id: str) -> Path | None:
    """The flag file that tells a child process its job ``job_id`` was revoked, if relaying is on."""
    folder = cancel_dir()
    if folder is None or "/" in job_id or "\\" in job_id or job_id in ("", ".", ".."):
        return None
    return folder / job_id


def make_cancel_dir(parent: Path | None = None) -> Path:
    """Create this worker's flag folder, named after its pid so a later start can tell it is stale."""
    parent = parent or Path(tempfile.gettempdir())
    folder = parent / f"{CANCEL_DIR_PREFIX}{os.getpid()}-{int(time.time())}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def remove_stale_cancel_dirs(parent: Path | None = None) -> None:
    """Remove flag folders left by workers that were killed (their pid is gone)."""
    parent = parent or Path(tempfile.gettempdir())
    for folder in parent.glob(f"{CANCEL_DIR_PREFIX}*-*"):
        try:
            pid = int(folder.name.removeprefix(CANCEL_DIR_PREFIX).split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue  # not ours, or another user's live worker


class CancelCheck:
    """``cancelled()`` for one job: was its task id revoked?

    Two sources, because Celery's revoked set lives in the worker's main process:

    * the in-process revoked set, which is the worker's own with the threads or solo pool;
    * the flag file ``CancelRelay`` writes for a running job whose id the main process saw
      revoked, which is how a prefork child learns of it.

    The engines poll this once per step; a stat of one file is cheap enough for that.
    """

    def __init__(self, job_id: str) -> None:
        """Watch ``job_id``."""
        self.job_id = job_id
        self._flag = cancel_flag(job_id)
        self._seen = False

    def __call__(self) -> bool:
        """True once the job was revoked (and from then on)."""
        if self._seen:
            return True
        from celery.worker import state

        if self.job_id in state.revoked or (self._flag is not None and self._flag.exists()):
            self._seen = True
            log.info("job %s was cancelled", self.job_id)
        return self._seen

    def cleanup(self) -> None:
        """Remove this job's flag file, if any."""
        if self._flag is not None:
            self._flag.unlink(missing_ok=True)


class CancelRelay(bootsteps.StartStopStep):
    """Relays ``revoke(job_id)`` to the pool child running that job.

    Twice a second this step writes a flag file for each running request whose id was revoked;
    ``CancelCheck`` in the child looks for it. With the threads pool the revoked set is shared
    and this is redundant.
    """

    label = "MirageCancelRelay"
    interval_s = 0.5

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        """Set up the relay state for one worker."""
        super().__init__(parent, **kwargs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._relayed: set[str] = set()

    def start(self, parent: Any) -> None:
        """Start the relay thread."""
        if cancel_dir() is None:
            return
        self._thread = threading.Thread(target=self._run, name="mirage-cancel-relay", daemon=True)
        self._thread.start()

    def stop(self, parent: Any) -> None:
        """Stop the relay thread and remove the flag folder."""
        self._stop.set()
        folder = cancel_dir()
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    def relay_once(self) -> None:
        """Write a flag for each running request that was revoked since the last pass."""
        from celery.worker import state

        active = {request.id for request in list(state.active_requests)}
        for job_id in active - self._relayed:
            if job_id in state.revoked:
                flag = cancel_flag(job_id)
                if flag is not None:
                    flag.touch()
                    self._relayed.add(job_id)
                    log.info("job %s revoked while running: asking it to stop", job_id)
        self._relayed &= active

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.relay_once()
            except Exception:  # never let the relay die; a missed cancel only wastes compute
                log.exception("cancel relay failed")
