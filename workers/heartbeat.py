"""A running job's heartbeat: its PROGRESS state refreshed on a timer, from a thread of the child.

The bot cannot tell from a job's state alone whether a worker that has said nothing for minutes
is slow (a long upscale) or dead (SIGKILL, OOM, a lost machine): the broker only notices after
its visibility timeout. So while a task runs, this thread stores the job's latest progress again
every ``HEARTBEAT_INTERVAL_S`` with ``worker`` (the node name) and ``heartbeat_at`` (unix
seconds). It lives in the process that runs the task, so it dies with it: a ``heartbeat_at``
that stops advancing means the worker is gone.

It stops with the task (``stop`` in the task's ``finally``), before Celery stores the final
state, and the sink refuses writes after that, so a late beat never overwrites SUCCESS/FAILURE.
"""

from __future__ import annotations

import logging
import threading
from types import TracebackType

from workers.progress import ProgressSink

log = logging.getLogger(__name__)


class Heartbeat:
    """Calls ``sink.beat()`` every ``interval_s`` seconds until stopped (first beat after one interval).

    The first beat waits one interval: the engines' own progress reports carry the same fields,
    so a job that reports progress is never without a heartbeat, and a job shorter than the
    interval costs no extra write.
    """

    def __init__(self, sink: ProgressSink, interval_s: float, *, name: str = "mirage-heartbeat") -> None:
        if interval_s <= 0:
            raise ValueError("the heartbeat interval must be positive")
        self.sink = sink
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Heartbeat:
        """Start beating in a daemon thread (it must never keep a dying process alive)."""
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sink.beat()
            except BaseException:  # the sink logs backend errors; anything else must not leak
                log.warning("heartbeat failed", exc_info=True)

    def stop(self) -> None:
        """Stop beating and close the sink: nothing is stored for this job after this returns."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(5.0, self.interval_s))
        self.sink.close()

    def __enter__(self) -> Heartbeat:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
