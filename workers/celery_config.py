"""The workers' Celery configuration as plain data: broker URLs, transport options, reliability.

Reliability choices, in one place:

* ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged only after its
  task returned, and a child killed mid-task (OOM, segfault) puts its message back.
* ``worker_prefetch_multiplier=1``: a GPU worker holds at most the one job it is running, so a
  crash strands nothing else and idle workers on other machines get the queued jobs.
* Redis redelivers a message nobody acknowledged after ``visibility_timeout``; it must be above
  the hard time limit, or a long job that is still running would be handed to a second worker.
* ``worker_deduplicate_successful_tasks``: a redelivered message whose task already stored a
  SUCCESS (the worker died between storing the result and acknowledging) is not run again.
* Bounded redeliveries (``workers.redelivery``) and cancellation (``workers.cancellation``) are
  wired in by the app factory, ``workers.celery_app``.
* Embedded broker (``sqla+sqlite://``, no server): workers consume through the durable transport
  of ``workers.sql_transport`` (alias ``mirage-sqla``); the bot keeps publishing with the stock
  ``sqla+`` transport: same tables, same rows. That transport has no fanout, so remote control
  (revoke, inspect/ping) does not reach workers in embedded mode.

Nothing here imports torch or kombu's SQLAlchemy models.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any

from workers.schema import QUEUE_API, QUEUE_GPU, TASK_OPENAI, TASK_SDXL
from workers.settings import WorkerSettings

log = logging.getLogger(__name__)

# The hard time limit kills a child; the visibility timeout must outlast it by this much so a
# job that is still legitimately running is never handed to a second worker.
VISIBILITY_MARGIN_S = 1

REDIS_SCHEMES = ("redis", "rediss")
DURABLE_SQLA = "mirage-sqla"  # the transport alias workers use for ``sqla+`` broker URLs
DURABLE_SQLA_CLASS = "workers.sql_transport:DurableTransport"


def url_scheme(url: str) -> str:
    """The URL's scheme without its ``+driver`` part: ``sqla+sqlite://`` -> ``sqla``."""
    return url.split("://", 1)[0].split("+", 1)[0].lower()


def sqlite_path(url: str) -> Path | None:
    """The file behind a SQLite URL (``sqla+sqlite:///x.db``, ``db+sqlite:///x.db``), else None."""
    head, sep, rest = url.partition("://")
    if not sep or "sqlite" not in head.lower().split("+"):
        return None
    path = rest[1:] if rest.startswith("/") else rest  # sqlite:///rel.db and sqlite:////abs.db
    path = path.split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path)


def prepare_sqlite(url: str) -> None:
    """Create a SQLite file's folder and switch the file to WAL (a persistent property of the file).

    WAL lets the bot read results while a worker writes progress, and the broker table be polled
    while a task stores its result, without "database is locked" errors.
    """
    path = sqlite_path(url)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with sqlite3.connect(path, timeout=30) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error as exc:  # another process may hold it mid-switch; it is an optimisation
        log.warning("could not switch %s to WAL: %s", path, exc)


def prepare_local_storage(settings: WorkerSettings) -> None:
    """Folders and WAL for the embedded SQLite broker and result database (no-op for servers).

    Called when a worker starts and by ``check``, not on import: importing the app must not
    create files in whatever directory the importer runs from.
    """
    for url in (settings.broker_url, settings.result_backend):
        prepare_sqlite(url)


def worker_broker_url(broker_url: str) -> str:
    """The URL workers connect with: ``sqla+…`` goes through the durable transport.

    Registers the ``mirage-sqla`` alias with kombu (its alias table is how a URL prefix finds a
    transport class by name); the class itself is imported only when a connection opens.
    """
    scheme, sep, rest = broker_url.partition("+")
    if sep and scheme.lower() in ("sqla", "sqlalchemy") and "://" in rest:
        from kombu.transport import TRANSPORT_ALIASES

        TRANSPORT_ALIASES.setdefault(DURABLE_SQLA, DURABLE_SQLA_CLASS)
        return f"{DURABLE_SQLA}+{rest}"
    return broker_url


def broker_transport_options(broker_url: str, visibility_timeout_s: int) -> dict[str, Any]:
    """Transport options for the broker in ``broker_url`` (as workers connect: see above).

    Options are per transport: kombu's stock SQLAlchemy transport passes unknown options straight
    to ``create_engine``, so only the durable transport, which filters them, gets a
    ``visibility_timeout``.
    """
    scheme = url_scheme(broker_url)
    if scheme in REDIS_SCHEMES:
        # Sweep for abandoned messages often enough that a crashed worker's job comes back
        # soon after its visibility timeout (kombu's default sweep is every ~100 s).
        sweep_s = max(1, min(10, visibility_timeout_s // 10))
        return {
            "visibility_timeout": visibility_timeout_s,
            "unacked_restore_interval": sweep_s,
            "unacked_restore_throttle": 1,
        }
    options: dict[str, Any] = {}
    if scheme in ("sqla", "sqlalchemy", DURABLE_SQLA) and sqlite_path(broker_url) is not None:
        options["connect_args"] = {"timeout": 30}  # SQLite busy timeout, seconds
    if scheme == DURABLE_SQLA:
        options["visibility_timeout"] = visibility_timeout_s
    return options


def check_limits(settings: WorkerSettings) -> None:
    """Refuse time limits that would redeliver running jobs or never soft-stop them."""
    if settings.task_soft_time_limit_s >= settings.task_time_limit_s:
        raise ValueError("TASK_SOFT_TIME_LIMIT_S must be below TASK_TIME_LIMIT_S")
    if settings.visibility_timeout_s < settings.task_time_limit_s + VISIBILITY_MARGIN_S:
        raise ValueError(
            "VISIBILITY_TIMEOUT_S must exceed TASK_TIME_LIMIT_S, or a running job is redelivered"
        )


def celery_config(settings: WorkerSettings) -> dict[str, Any]:
    """The ``app.conf`` values for ``settings``; raises ``ValueError`` for inconsistent limits."""
    check_limits(settings)
    broker_url = worker_broker_url(settings.broker_url)
    return {
        "broker_url": broker_url,
        "result_backend": settings.result_backend,
        "include": ["workers.tasks"],
        "task_routes": {TASK_SDXL: {"queue": QUEUE_GPU}, TASK_OPENAI: {"queue": QUEUE_API}},
        "task_default_queue": QUEUE_GPU,
        # JSON only: pickle from a broker anyone on the network can write to is code execution.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # Reliability (see module docstring).
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "worker_deduplicate_successful_tasks": True,
        "task_soft_time_limit": settings.task_soft_time_limit_s,
        "task_time_limit": settings.task_time_limit_s,
        "broker_transport_options": broker_transport_options(broker_url, settings.visibility_timeout_s),
        # The bot sends --turbo/--fast/--relax as message priorities (bot/dispatch.py). RabbitMQ
        # honours them only on queues declared with x-max-priority, identically on both sides;
        # Redis needs nothing here (kombu's default priority steps 0/3/6/9 match the bot's values).
        "task_queue_max_priority": 10 if url_scheme(broker_url) in ("amqp", "amqps", "pyamqp") else None,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,  # a worker waits out a broker restart
        # A lost broker connection does not stop a running GPU job: its result is idempotent,
        # so at worst the redelivered copy is deduplicated or recomputed.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # Results: the bot polls AsyncResult(job_id); a result write survives backend blips.
        # The job tasks turn track_started off and store STARTED themselves, once the result
        # store answers and the job has not ended already (workers.tasks.admit).
        "task_track_started": True,
        "result_extended": True,
        "result_backend_always_retry": True,
        "result_backend_max_retries": 10,
        "result_expires": max(86400, 4 * settings.visibility_timeout_s),
        "database_engine_options": (
            {"connect_args": {"timeout": 30}} if sqlite_path(settings.result_backend) else {}
        ),
        "worker_hijack_root_logger": True,
    }
