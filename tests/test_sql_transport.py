"""The embedded broker's durable transport (``workers.sql_transport``): its delivery contract.

Messages are published with kombu's stock ``sqla+`` transport, exactly as the bot publishes, and
consumed through the worker's ``mirage-sqla+`` URL. The SIGKILL redelivery of a real worker over
this transport is tested in ``tests/test_worker_process.py``.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection, Queue

from workers.celery_config import broker_transport_options, worker_broker_url
from workers.sql_transport import DurableTransport, sweep_interval_s

pytestmark = pytest.mark.timeout(60)

VISIBILITY_S = 1  # the shortest timeout: sweeps then run every second


@pytest.fixture
def urls(tmp_path: Path) -> tuple[str, str]:
    stock = f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    return stock, worker_broker_url(stock)


def _durable(url: str, visibility_s: int = VISIBILITY_S) -> Connection:
    return Connection(url, transport_options=broker_transport_options(url, visibility_s))


def _publish(url: str, *bodies: dict[str, Any]) -> None:
    with Connection(url) as conn:  # the stock transport, as the bot publishes
        producer = conn.Producer()
        for body in bodies:
            producer.publish(body, routing_key="gpu", declare=[Queue("gpu")])


def _rows(url: str) -> list[tuple[int, int]]:
    path = url.split(":///", 1)[1]
    with sqlite3.connect(path) as db:
        return db.execute("SELECT id, visible FROM kombu_message ORDER BY id").fetchall()


def test_the_worker_url_resolves_to_the_durable_transport(urls: tuple[str, str]) -> None:
    _, durable = urls
    with _durable(durable) as conn:
        assert isinstance(conn.transport, DurableTransport)


def test_publish_consume_ack_deletes_the_row(urls: tuple[str, str]) -> None:
    stock, durable = urls
    _publish(stock, {"n": 1}, {"n": 2})
    assert [visible for _, visible in _rows(stock)] == [1, 1]
    with _durable(durable) as conn, conn.SimpleQueue("gpu") as queue:
        first = queue.get(timeout=5)
        assert first.payload == {"n": 1}  # oldest first
        assert [visible for _, visible in _rows(stock)] == [0, 1]  # delivered rows are hidden
        first.ack()
        assert len(_rows(stock)) == 1
        second = queue.get(timeout=5)
        assert second.payload == {"n": 2}
        second.ack()
    assert _rows(stock) == []


def test_reject_without_requeue_deletes_the_row(urls: tuple[str, str]) -> None:
    stock, durable = urls
    _publish(stock, {"n": 1})
    with _durable(durable) as conn, conn.SimpleQueue("gpu") as queue:
        queue.get(timeout=5).reject(requeue=False)
    assert _rows(stock) == []


def test_requeue_makes_the_same_row_visible_again(urls: tuple[str, str]) -> None:
    stock, durable = urls
    _publish(stock, {"n": 1})
    (row,) = _rows(stock)
    with _durable(durable) as conn, conn.SimpleQueue("gpu") as queue:
        queue.get(timeout=5).requeue()
        assert _rows(stock) == [(row[0], 1)]  # no copy inserted
        again = queue.get(timeout=5)
        assert again.payload == {"n": 1}
        assert again.delivery_info.get("redelivered") is True
        again.ack()
    assert _rows(stock) == []


def test_an_unacked_message_comes_back_only_after_the_visibility_timeout(urls: tuple[str, str]) -> None:
    stock, durable = urls
    _publish(stock, {"n": 1})
    with _durable(durable) as conn, conn.SimpleQueue("gpu") as queue:
        assert queue.get(timeout=5).payload == {"n": 1}
        delivered_at = time.monotonic()
        queue.channel.qos._delivered.clear()  # the consumer "dies": no ack, nothing restored
    assert [visible for _, visible in _rows(stock)] == [0]
    with _durable(durable) as conn, conn.SimpleQueue("gpu") as queue:
        # Another consumer polls; the message is handed out again once its delivery is stale.
        message = queue.get(timeout=20)
        assert time.monotonic() - delivered_at >= VISIBILITY_S
        assert message.payload == {"n": 1}
        assert message.delivery_info.get("redelivered") is True
        message.ack()
    assert _rows(stock) == []


def test_a_long_visibility_timeout_keeps_an_unacked_message_hidden(urls: tuple[str, str]) -> None:
    stock, durable = urls
    _publish(stock, {"n": 1})
    with _durable(durable, visibility_s=3600) as conn, conn.SimpleQueue("gpu") as queue:
        assert queue.get(timeout=5).payload == {"n": 1}
        queue.channel.qos._delivered.clear()
    with _durable(durable, visibility_s=3600) as conn, conn.SimpleQueue("gpu") as queue:
        with pytest.raises(queue.Empty):
            queue.get(timeout=1.5)  # still running elsewhere, as far as the broker knows
    assert [visible for _, visible in _rows(stock)] == [0]


def test_kombu_options_never_reach_create_engine(urls: tuple[str, str]) -> None:
    _, durable = urls
    options = {**broker_transport_options(durable, 60), "polling_interval": 0.1, "max_retries": 1}
    with Connection(durable, transport_options=options) as conn, conn.SimpleQueue("gpu") as queue:
        queue.put({"n": 1})
        message = queue.get(timeout=5)
        assert message.payload == {"n": 1}
        message.ack()


@pytest.mark.parametrize(("timeout_s", "sweep_s"), [(1, 1.0), (60, 6.0), (1800, 10.0)])
def test_sweeps_follow_the_visibility_timeout(timeout_s: float, sweep_s: float) -> None:
    assert sweep_interval_s(timeout_s) == sweep_s


def test_a_queue_another_worker_created_meanwhile_is_no_error(urls: tuple[str, str]) -> None:
    # Two workers starting at once both look for the queue, find none and insert it; kombu's lock
    # is per process, so the second insert hits the UNIQUE constraint and crashed that worker.
    stock, durable = urls
    _publish(stock, {"n": 1})  # the queue row exists: the other worker was first
    with _durable(durable) as conn:
        session = conn.default_channel.session
        real_query = session.query
        misses = [True, True]  # kombu looks twice (before and under its lock); both miss the row

        class NotYet:
            def filter(self, *_args: Any) -> NotYet:
                return self

            def first(self) -> None:
                return None

        def query(*args: Any) -> Any:
            return NotYet() if misses and misses.pop() else real_query(*args)

        session.query = query
        with conn.SimpleQueue("gpu") as queue:
            message = queue.get(timeout=5)
            assert message.payload == {"n": 1}
            message.ack()
        assert not misses
