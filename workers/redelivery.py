"""Bounded redeliveries: how many times each job's task started, across processes and crashes.

Every start of a task increments a counter keyed by the job id; past ``1 + MAX_REDELIVERIES``
starts the task returns an ``ENGINE_ERROR`` outcome instead of running, so a job that kills its
worker (OOM, driver crash) cannot crash-loop the fleet. The counter lives where all workers see
it: the Redis broker or result backend, else the SQL result database.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod

from workers.celery_config import REDIS_SCHEMES, url_scheme
from workers.settings import WorkerSettings

log = logging.getLogger(__name__)


class DeliveryCounter(ABC):
    """Counts how many times each job's task started, across processes, machines and crashes."""

    @abstractmethod
    def incr(self, job_id: str) -> int:
        """Record one more start of ``job_id`` and return the number of starts so far."""


class RedisDeliveryCounter(DeliveryCounter):
    """``INCR mirage:deliveries:<job id>`` with an expiry, on the Redis broker or result backend."""

    def __init__(self, url: str, ttl_s: int) -> None:
        """Connect lazily to the Redis at ``url``; keys expire after ``ttl_s`` seconds."""
        import redis

        self._client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=10)
        self._ttl_s = ttl_s

    @staticmethod
    def key(job_id: str) -> str:
        """The Redis key that counts ``job_id``'s starts."""
        return f"mirage:deliveries:{job_id}"

    def incr(self, job_id: str) -> int:
        """Increment and return the job's start count."""
        key = self.key(job_id)
        pipe = self._client.pipeline()
        pipe.incr(key)
        pipe.expire(key, self._ttl_s)
        count, _ = pipe.execute()
        return int(count)


class SQLDeliveryCounter(DeliveryCounter):
    """An upserted row per job in the database result backend's database (SQLite or PostgreSQL)."""

    TABLE = "mirage_task_deliveries"

    def __init__(self, sqlalchemy_url: str) -> None:
        """Use the database at ``sqlalchemy_url``; nothing connects until the first count.

        The table is created then, not here: a database unreachable when a process makes its
        counter would otherwise leave that process without one (``NullDeliveryCounter``) for good,
        while a failed count only fails open for that one start. Raises ``ValueError`` for a
        database without an upsert.
        """
        from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, create_engine

        connect_args = {"timeout": 30} if sqlalchemy_url.startswith("sqlite") else {}
        self._engine = create_engine(sqlalchemy_url, connect_args=connect_args, pool_pre_ping=True)
        self._table = Table(
            self.TABLE,
            MetaData(),
            Column("job_id", String(255), primary_key=True),
            Column("deliveries", Integer, nullable=False),
            Column("updated_at", DateTime(timezone=True), nullable=False),
        )
        self._created = False
        dialect = self._engine.dialect.name
        if dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        elif dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            raise ValueError(f"no upsert for the {dialect} result backend")
        self._insert = insert

    def incr(self, job_id: str) -> int:
        """Increment and return the job's start count in one atomic upsert."""
        from datetime import UTC, datetime

        if not self._created:
            self._table.create(self._engine, checkfirst=True)
            self._created = True
        now = datetime.now(UTC)
        table = self._table
        stmt = (
            self._insert(table)
            .values(job_id=job_id, deliveries=1, updated_at=now)
            .on_conflict_do_update(
                index_elements=[table.c.job_id],
                set_={"deliveries": table.c.deliveries + 1, "updated_at": now},
            )
            .returning(table.c.deliveries)
        )
        with self._engine.begin() as conn:
            return int(conn.execute(stmt).scalar_one())

    def close(self) -> None:
        """Release the connection pool."""
        self._engine.dispose()


class NullDeliveryCounter(DeliveryCounter):
    """No shared store: every start counts as the first, so redeliveries are not bounded."""

    def incr(self, job_id: str) -> int:
        """Always 1."""
        return 1


def make_delivery_counter(settings: WorkerSettings) -> DeliveryCounter:
    """The most reliable counter the configuration offers: Redis, then the SQL result database."""
    ttl_s = max(86400, 4 * settings.visibility_timeout_s)
    for url in (settings.broker_url, settings.result_backend):
        if url_scheme(url) in REDIS_SCHEMES:
            return RedisDeliveryCounter(url, ttl_s)
    if settings.result_backend.startswith("db+"):
        try:
            return SQLDeliveryCounter(settings.result_backend[3:])
        except Exception as exc:
            log.warning("delivery counter unavailable (%s): redeliveries are not bounded", exc)
            return NullDeliveryCounter()
    log.warning("no Redis or SQL result backend: redeliveries are not bounded")
    return NullDeliveryCounter()


def over_the_bound(starts: int, max_redeliveries: int) -> bool:
    """Whether a job's ``starts``-th start is past ``1 + max_redeliveries`` and must not run."""
    return starts > 1 + max_redeliveries
