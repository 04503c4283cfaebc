"""A thread-safe requests-per-minute limiter shared by every job in a worker process.

A sliding window (a log of the last minute's start times) rather than a token bucket: a bucket
as deep as the limit lets through up to twice the limit in one 60 s window, which is exactly
what gets an OpenAI organisation 429s. The clock and sleep are injectable so tests never wait.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable


class RateLimiter:
    """At most ``per_minute`` acquisitions in any ``window_s`` seconds, across threads."""

    def __init__(
        self,
        per_minute: int,
        *,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        poll_s: float = 0.25,
    ) -> None:
        if per_minute < 1:
            raise ValueError("per_minute must be at least 1")
        self.per_minute = per_minute
        self.window_s = window_s
        self._clock = clock
        self._sleep = sleep
        self._poll_s = poll_s  # longest sleep between checks of ``stop``
        self._starts: deque[float] = deque()
        self._lock = threading.Lock()

    def try_acquire(self) -> float:
        """Take a slot now and return 0.0, or return the seconds until one frees up."""
        with self._lock:
            now = self._clock()
            while self._starts and self._starts[0] <= now - self.window_s:
                self._starts.popleft()
            if len(self._starts) < self.per_minute:
                self._starts.append(now)
                return 0.0
            return max(self._starts[0] + self.window_s - now, 1e-3)

    def acquire(self, stop: Callable[[], bool] | None = None) -> bool:
        """Block until a slot is free; False (no slot taken) as soon as ``stop()`` turns true.

        The lock is never held while sleeping, so waiting threads do not serialise each other,
        and ``stop`` is polled so a cancelled job does not sit out a full minute.
        """
        while True:
            if stop is not None and stop():
                return False
            wait = self.try_acquire()
            if wait == 0.0:
                return True
            self._sleep(min(wait, self._poll_s))


_shared: dict[int, RateLimiter] = {}
_shared_lock = threading.Lock()


def shared_rate_limiter(per_minute: int) -> RateLimiter:
    """The process-wide limiter for ``per_minute`` (one per configured rate; normally just one)."""
    with _shared_lock:
        limiter = _shared.get(per_minute)
        if limiter is None:
            limiter = _shared[per_minute] = RateLimiter(per_minute)
        return limiter
