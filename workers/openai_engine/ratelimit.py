"""The OpenAI requests-per-minute limit: shared by every API worker through Redis, or per process.

A sliding window (a log of the last minute's start times) rather than a token bucket: a bucket
as deep as the limit lets through up to twice the limit in one 60 s window, which is exactly
what gets an OpenAI organisation 429s.

* :class:`RedisRateLimiter`: the ``limits`` library's moving window in Redis, one count for
  every worker of the deployment, so ``OPENAI_REQUESTS_PER_MINUTE`` is the organisation's limit
  however many API workers run. Used when ``OPENAI_RATE_LIMIT_STORAGE``, or else the result
  backend, is a Redis URL.
* :class:`RateLimiter`: in process (the embedded install, one worker), thread-safe; its clock
  and sleep are injectable so tests never wait.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workers.settings import WorkerSettings

log = logging.getLogger(__name__)


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


class RedisRateLimiter:
    """At most ``per_minute`` acquisitions in any ``window_s`` seconds across every process using
    the same Redis and ``key``: a ``limits`` moving window.

    When Redis cannot be reached the request goes through the in-process ``fallback`` limiter
    (with a warning), so an outage slows nobody down more than one worker's own limit would.
    """

    def __init__(
        self,
        per_minute: int,
        storage_uri: str,
        *,
        key: str = "openai-requests",
        window_s: float = 60.0,
        poll_s: float = 0.25,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if per_minute < 1:
            raise ValueError("per_minute must be at least 1")
        from limits import RateLimitItemPerSecond
        from limits.storage import storage_from_string
        from limits.strategies import MovingWindowRateLimiter

        self.per_minute = per_minute
        self.window_s = window_s
        self.key = key
        self._item = RateLimitItemPerSecond(per_minute, max(1, round(window_s)))
        self._storage = storage_from_string(storage_uri, key_prefix="mirage")
        self._limiter = MovingWindowRateLimiter(self._storage)
        self._sleep = sleep
        self._poll_s = poll_s
        self._fallback = RateLimiter(per_minute, window_s=window_s, sleep=sleep, poll_s=poll_s)
        self._warned = False

    def try_acquire(self) -> float:
        """Take a slot now and return 0.0, or return the seconds until one frees up."""
        try:
            if self._limiter.hit(self._item, self.key):
                self._warned = False
                return 0.0
            stats = self._limiter.get_window_stats(self._item, self.key)
        except Exception as exc:  # Redis down or unreachable: limit this process on its own
            if not self._warned:
                log.warning(
                    "OpenAI rate limit storage unreachable (%s); limiting per process", type(exc).__name__
                )
                self._warned = True
            return self._fallback.try_acquire()
        return max(stats.reset_time - time.time(), 1e-3)

    def acquire(self, stop: Callable[[], bool] | None = None) -> bool:
        """Block until a slot is free; False (no slot taken) as soon as ``stop()`` turns true."""
        while True:
            if stop is not None and stop():
                return False
            wait = self.try_acquire()
            if wait == 0.0:
                return True
            self._sleep(min(wait, self._poll_s))

    def reset(self) -> None:
        """Forget every recorded request (tests, or an operator after changing the limit)."""
        self._limiter.clear(self._item, self.key)


Limiter = RateLimiter | RedisRateLimiter
REDIS_SCHEMES = ("redis", "rediss")


def limit_storage(settings: WorkerSettings) -> str | None:
    """The Redis URL the OpenAI limit is counted in, or None to count per process.

    ``OPENAI_RATE_LIMIT_STORAGE`` when set (a non-Redis value there is refused); else the result
    backend when it is Redis, which every API worker already shares.
    """
    configured = (settings.openai_rate_limit_storage or "").strip()
    if configured:
        if configured.split("://", 1)[0].lower() not in REDIS_SCHEMES:
            raise ValueError("OPENAI_RATE_LIMIT_STORAGE must be a redis:// or rediss:// URL")
        return configured
    backend = settings.result_backend
    return backend if backend.split("://", 1)[0].lower() in REDIS_SCHEMES else None


_shared: dict[tuple[int, str | None], Limiter] = {}
_shared_lock = threading.Lock()


def shared_rate_limiter(per_minute: int, storage_uri: str | None = None) -> Limiter:
    """The process-wide limiter for ``per_minute`` in ``storage_uri`` (Redis) or in process."""
    with _shared_lock:
        limiter = _shared.get((per_minute, storage_uri))
        if limiter is None:
            limiter = RedisRateLimiter(per_minute, storage_uri) if storage_uri else RateLimiter(per_minute)
            _shared[(per_minute, storage_uri)] = limiter
        return limiter


def rate_limiter_for(settings: WorkerSettings) -> Limiter:
    """The limiter the OpenAI engine uses under ``settings`` (see :func:`limit_storage`)."""
    return shared_rate_limiter(settings.openai_requests_per_minute, limit_storage(settings))
