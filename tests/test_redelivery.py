"""Redelivery counting (``workers.redelivery``): per-job start counts shared by every worker."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from workers.redelivery import (
    NullDeliveryCounter,
    RedisDeliveryCounter,
    SQLDeliveryCounter,
    make_delivery_counter,
    over_the_bound,
)
from workers.settings import WorkerSettings


def _settings(**overrides: Any) -> WorkerSettings:
    values: dict[str, Any] = {
        "broker_url": "redis://127.0.0.1:6379/0",
        "result_backend": "redis://127.0.0.1:6379/1",
        "warmup": False,
    }
    values.update(overrides)
    return WorkerSettings(_env_file=None, **values)  # type: ignore[call-arg]


def test_sql_delivery_counter_counts_per_job(tmp_path: Path) -> None:
    counter = SQLDeliveryCounter(f"sqlite:///{tmp_path / 'results.db'}")
    assert [counter.incr("a"), counter.incr("a"), counter.incr("b"), counter.incr("a")] == [1, 2, 1, 3]
    again = SQLDeliveryCounter(f"sqlite:///{tmp_path / 'results.db'}")  # another process, same file
    assert again.incr("a") == 4
    counter.close()
    again.close()


def test_sql_delivery_counter_on_postgres(pg_url: str) -> None:
    counter = SQLDeliveryCounter(pg_url)
    assert [counter.incr("a"), counter.incr("a"), counter.incr("b")] == [1, 2, 1]
    counter.close()


def test_redis_delivery_counter_counts_and_expires(redis_url: str) -> None:
    counter = RedisDeliveryCounter(redis_url, ttl_s=60)
    job = f"test-{uuid.uuid4().hex}"
    assert [counter.incr(job), counter.incr(job)] == [1, 2]
    import redis

    assert 0 < redis.Redis.from_url(redis_url).ttl(RedisDeliveryCounter.key(job)) <= 60


def test_null_counter_counts_every_start_as_the_first() -> None:
    counter = NullDeliveryCounter()
    assert [counter.incr("a"), counter.incr("a")] == [1, 1]


def test_counter_choice_follows_the_configuration(tmp_path: Path) -> None:
    assert isinstance(make_delivery_counter(_settings()), RedisDeliveryCounter)
    redis_backend = _settings(broker_url="sqla+sqlite:///x.db", result_backend="redis://127.0.0.1:6379/1")
    assert isinstance(make_delivery_counter(redis_backend), RedisDeliveryCounter)
    sql = _settings(broker_url="sqla+sqlite:///x.db", result_backend=f"db+sqlite:///{tmp_path / 'r.db'}")
    assert isinstance(make_delivery_counter(sql), SQLDeliveryCounter)
    none = _settings(broker_url="memory://", result_backend="cache+memory://")
    assert isinstance(make_delivery_counter(none), NullDeliveryCounter)


@pytest.mark.parametrize(
    ("starts", "max_redeliveries", "refused"),
    [(1, 0, False), (2, 0, True), (3, 2, False), (4, 2, True), (4, 3, False)],
)
def test_the_bound_allows_one_start_plus_the_redeliveries(
    starts: int, max_redeliveries: int, refused: bool
) -> None:
    assert over_the_bound(starts, max_redeliveries) is refused


def test_a_result_database_unreachable_at_first_use_does_not_unbound_redeliveries(tmp_path: Path) -> None:
    # The runtime makes its counter once per process, at the first job. A database that cannot be
    # opened then (PostgreSQL restarting; here a SQLite folder not there yet) must not leave the
    # process with a counter that never counts: each start fails open until it is back.
    folder = tmp_path / "not-yet"
    counter = make_delivery_counter(
        _settings(broker_url="memory://", result_backend=f"db+sqlite:///{folder / 'r.db'}")
    )
    with pytest.raises(OperationalError):  # that start fails open (workers.tasks._count_start)
        counter.incr("job")
    folder.mkdir()
    assert [counter.incr("job"), counter.incr("job")] == [1, 2]
