"""The embedded broker's transport for workers: kombu's SQLAlchemy transport, made durable.

The stock ``sqla+`` transport hides a row when it delivers it and never looks at it again: a
worker killed mid-task loses its job (acks-late buys nothing), and acknowledged rows pile up
forever, input images included. :class:`DurableTransport` keeps the same tables and message
format, so the bot still publishes with the stock transport, but:

* deletes the row on ack (or on a reject without requeue);
* makes it visible again on a requeue (worker lost, warm shutdown) instead of inserting a copy;
* makes hidden rows whose delivery is older than ``visibility_timeout`` (a transport option,
  seconds, as for Redis) visible again, marked redelivered, like Redis does for a consumer that
  died without acknowledging.

Workers reach it through the ``mirage-sqla+`` URL prefix (see
:func:`workers.celery_config.worker_broker_url`). It relies on kombu's ``Channel`` internals
(``_get``, ``_restore``, ``qos._delivered``, the message model's ``visible`` and ``sent_at``
columns), which is why pyproject pins kombu to one minor version.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from json import dumps, loads
from typing import Any

from kombu.transport import sqlalchemy as sqla
from kombu.utils.encoding import bytes_to_str
from sqlalchemy import create_engine, delete, update
from sqlalchemy.exc import IntegrityError

log = logging.getLogger(__name__)

DEFAULT_VISIBILITY_TIMEOUT_S = 1800.0
ROW_KEY = "mirage_sqla_row"  # where a delivered message remembers its row
# Transport options that are kombu's or ours, not create_engine's.
NOT_ENGINE_OPTIONS = frozenset(
    {
        "queue_tablename",
        "message_tablename",
        "callback",
        "errback",
        "max_retries",
        "interval_start",
        "interval_step",
        "interval_max",
        "retry_errors",
        "visibility_timeout",
        "polling_interval",
    }
)


def sweep_interval_s(visibility_timeout_s: float) -> float:
    """How often a consumer looks for abandoned rows: a tenth of the timeout, within 1..10 s."""
    return max(1.0, min(10.0, visibility_timeout_s / 10))


class DurableChannel(sqla.Channel):  # type: ignore[misc]
    """A channel with Redis-like acknowledgement semantics over kombu's SQL tables."""

    def __init__(self, connection: Any, **kwargs: Any) -> None:
        """Open the channel; ``visibility_timeout`` comes from the connection's transport options."""
        super().__init__(connection, **kwargs)
        options = connection.client.transport_options
        self.visibility_timeout = float(options.get("visibility_timeout", DEFAULT_VISIBILITY_TIMEOUT_S))
        self._last_sweep = 0.0

    def _engine_from_config(self) -> Any:
        conninfo = self.connection.client
        options = {k: v for k, v in conninfo.transport_options.items() if k not in NOT_ENGINE_OPTIONS}
        return create_engine(conninfo.hostname, **options)

    def _sweep(self, queue_id: int) -> None:
        """Give back rows whose consumer vanished more than the visibility timeout ago."""
        now = time.monotonic()
        if now - self._last_sweep < sweep_interval_s(self.visibility_timeout):
            return
        self._last_sweep = now
        cls = self.message_cls
        # kombu stamps sent_at with naive local time; compare like with like.
        cutoff = datetime.now() - timedelta(seconds=self.visibility_timeout)
        stale = (
            self.session.query(cls)
            .filter(cls.queue_id == queue_id, cls.visible == False, cls.sent_at < cutoff)  # noqa: E712
            .all()
        )
        for row in stale:
            payload = loads(bytes_to_str(row.payload))
            payload.get("properties", {}).get("delivery_info", {})["redelivered"] = True
            row.payload = dumps(payload)
            row.visible = True
            log.warning("restoring unacknowledged message %s (consumer gone)", row.id)

    def _get_or_create(self, queue: str) -> Any:
        """The queue's row, created if missing; another process creating it first is no error.

        kombu guards the creation with a lock of its own process only: two workers starting at
        once on one database both insert the queue, and the loser crashed at start on the
        UNIQUE constraint.
        """
        try:
            return super()._get_or_create(queue)
        except IntegrityError:
            self.session.rollback()
            found = self.session.query(self.queue_cls).filter(self.queue_cls.name == queue).first()
            if found is None:
                raise
            return found

    def _get(self, queue: str) -> Any:
        obj = self._get_or_create(queue)
        cls = self.message_cls
        if self.session.bind.name == "sqlite":
            self.session.execute(sqla.text("BEGIN IMMEDIATE TRANSACTION"))
        try:
            self._sweep(obj.id)
            msg = (
                self.session.query(cls)
                .with_for_update()
                .filter(cls.queue_id == obj.id, cls.visible != False)  # noqa: E712
                .order_by(cls.sent_at, cls.id)
                .limit(1)
                .first()
            )
            if msg is None:
                raise sqla.Empty()
            msg.visible = False  # the column's onupdate stamps sent_at: the delivery time
            payload = loads(bytes_to_str(msg.payload))
            payload["properties"][ROW_KEY] = msg.id
            return payload
        finally:
            self.session.commit()

    def _row_of(self, delivery_tag: Any) -> int | None:
        message = self.qos._delivered.get(delivery_tag) if self.qos else None
        return None if message is None else message.properties.get(ROW_KEY)

    def _execute(self, statement: Any) -> None:
        # Its own transaction: acks may come from pool threads, and the channel's ORM session
        # is not thread-safe.
        engine, _ = self._open()
        with engine.begin() as conn:
            conn.execute(statement)

    def _delete(self, row: int) -> None:
        table = self.message_cls.__table__
        self._execute(delete(table).where(table.c.id == row))

    def basic_ack(self, delivery_tag: Any, multiple: bool = False) -> None:
        """Acknowledge, then delete the message's row."""
        row = self._row_of(delivery_tag)
        super().basic_ack(delivery_tag, multiple)
        if row is not None:
            self._delete(row)

    def basic_reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        """Reject: a requeue makes the row visible again (via ``_restore``), else it is deleted."""
        row = self._row_of(delivery_tag)
        super().basic_reject(delivery_tag, requeue=requeue)
        if row is not None and not requeue:
            self._delete(row)

    def _restore(self, message: Any) -> None:
        row = message.properties.get(ROW_KEY)
        if row is None:
            super()._restore(message)
            return
        payload = message.serializable()
        payload["properties"] = {k: v for k, v in payload["properties"].items() if k != ROW_KEY}
        payload["properties"].setdefault("delivery_info", {})["redelivered"] = True
        table = self.message_cls.__table__
        self._execute(
            update(table)
            .where(table.c.id == row)
            .values(visible=True, payload=dumps(payload), version=table.c.version + 1)
        )


class DurableTransport(sqla.Transport):  # type: ignore[misc]
    """kombu's SQLAlchemy transport with :class:`DurableChannel`."""

    Channel = DurableChannel
