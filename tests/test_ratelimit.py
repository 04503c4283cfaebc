"""The OpenAI requests-per-minute limit: one budget in Redis shared by every API worker.

Runs against the real Redis (database 14, flushed first) with two limiter instances standing in
for two worker processes. Without Redis these tests skip (fail under MIRAGE_REQUIRE_SERVICES=1).
"""

from __future__ import annotations

import uuid

import pytest
from conftest import fresh_redis_db

from workers.openai_engine.ratelimit import (
    RateLimiter,
    RedisRateLimiter,
    limit_storage,
    rate_limiter_for,
)
from workers.settings import WorkerSettings

LIMIT_DB = 15  # its own: tests/reliability/test_worker_crash.py flushes 14, maybe at the same time (-n 2)


@pytest.fixture
def redis_url() -> str:
    """A flushed Redis database of its own."""
    return fresh_redis_db(LIMIT_DB)


def test_two_limiters_share_one_budget_in_redis(redis_url: str) -> None:
    """Two workers with a limit of 5: together they get 5 slots, and each is told how long to wait."""
    key = f"openai-{uuid.uuid4().hex[:8]}"
    first = RedisRateLimiter(5, redis_url, key=key)
    second = RedisRateLimiter(5, redis_url, key=key)
    granted = [
        limiter.try_acquire() == 0.0 for limiter in (first, second, first, second, first, second, first)
    ]
    assert granted.count(True) == 5
    assert granted == [True] * 5 + [False, False]
    wait = second.try_acquire()
    assert 0 < wait <= 60  # the oldest slot frees within the minute window


def test_the_window_moves(redis_url: str) -> None:
    """After the window has passed, slots are free again (a 1 s window, so the test waits 1 s)."""
    key = f"openai-{uuid.uuid4().hex[:8]}"
    limiter = RedisRateLimiter(2, redis_url, key=key, window_s=1, poll_s=0.05)
    other = RedisRateLimiter(2, redis_url, key=key, window_s=1, poll_s=0.05)
    assert limiter.try_acquire() == 0.0 and other.try_acquire() == 0.0
    wait = limiter.try_acquire()
    assert 0 < wait <= 1.0
    assert other.acquire()  # blocks until the window moves on, then takes a slot


def test_acquire_stops_when_told(redis_url: str) -> None:
    """A cancelled job stops waiting for a slot without taking one."""
    key = f"openai-{uuid.uuid4().hex[:8]}"
    limiter = RedisRateLimiter(1, redis_url, key=key, poll_s=0.01)
    assert limiter.acquire()
    calls = iter([False, True])
    assert limiter.acquire(stop=lambda: next(calls)) is False


def test_unreachable_redis_limits_per_process() -> None:
    """Redis down: requests still go out, under this process's own limit."""
    limiter = RedisRateLimiter(2, "redis://127.0.0.1:1/0", key="openai-down")
    assert [limiter.try_acquire() == 0.0 for _ in range(3)] == [True, True, False]


def test_storage_follows_the_settings() -> None:
    """Explicit storage first, else a Redis result backend, else in process."""
    base = {"_env_file": None}
    embedded = WorkerSettings(**base)  # type: ignore[arg-type]
    assert limit_storage(embedded) is None
    assert isinstance(rate_limiter_for(embedded), RateLimiter)
    on_redis = WorkerSettings(**base, result_backend="redis://r:6379/1")  # type: ignore[arg-type]
    assert limit_storage(on_redis) == "redis://r:6379/1"
    explicit = WorkerSettings(**base, openai_rate_limit_storage="redis://limits:6379/3")  # type: ignore[arg-type]
    assert limit_storage(explicit) == "redis://limits:6379/3"
    with pytest.raises(ValueError, match="redis"):
        limit_storage(WorkerSettings(**base, openai_rate_limit_storage="memory://"))  # type: ignore[arg-type]


def test_engines_of_one_process_share_the_redis_limiter(redis_url: str) -> None:
    settings = WorkerSettings(_env_file=None, result_backend=redis_url)  # type: ignore[call-arg]
    first, second = rate_limiter_for(settings), rate_limiter_for(settings)
    assert isinstance(first, RedisRateLimiter) and first is second
