"""The Celery application the workers run: broker, routes, reliability settings and helpers.

``celery -A workers.celery_app worker`` and ``python -m workers worker`` both use the module-level
``app``. Importing this module is cheap and never imports torch: the engines are loaded lazily
inside the worker's child processes (see ``workers.tasks``).

Reliability choices, in one place (SPEC §3 "Nothing is lost", §6):

* ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged only after its
  task returned, and a child killed mid-task (OOM, segfault) puts its message back.
* ``worker_prefetch_multiplier=1``: a GPU worker holds at most the one job it is running, so a
  crash strands nothing else and idle workers on other machines get the queued jobs.
* Redis redelivers a message nobody acknowledged after ``visibility_timeout``; it must be above
  the hard time limit, or a long job that is still running would be handed to a second worker.
* ``worker_deduplicate_successful_tasks``: a redelivered message whose task already stored a
  SUCCESS (the worker died between storing the result and acknowledging) is not run again.
* Bounded redeliveries: every start of a task increments a counter keyed by the job id (see
  ``DeliveryCounter``); past ``1 + max_redeliveries`` starts the task returns an ``ENGINE_ERROR``
  outcome instead of running, so a job that kills its worker cannot crash-loop the fleet.
* Cancellation: the bot revokes the task id. Plain ``revoke`` only reaches the worker's main
  process, so ``CancelRelay`` copies revoked ids of running tasks into per-job flag files that the
  prefork child polls (``workers.progress.CancelCheck``).
* Embedded broker (``sqla+sqlite://``, no server): workers consume through a durable subclass of
  kombu's SQLAlchemy transport (``mirage-sqla``) that gives Redis-like semantics (delete on ack,
  redeliver after ``visibility_timeout``); the stock transport loses a job whose worker is killed
  and keeps every acknowledged row forever. The bot keeps publishing with the stock ``sqla+``
  transport: same tables, same rows. That transport has no fanout, so remote control (revoke,
  inspect/ping) does not reach workers in embedded mode.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from celery import Celery, bootsteps
from celery.signals import celeryd_init

from workers.schema import QUEUE_API, QUEUE_GPU, TASK_OPENAI, TASK_SDXL
from workers.settings import WorkerSettings, get_settings

log = logging.getLogger(__name__)

# Environment variables the worker's main process sets for its children (inherited across fork).
ENV_CANCEL_DIR = "MIRAGE_CANCEL_DIR"
ENV_WORKER_QUEUES = "MIRAGE_WORKER_QUEUES"
ENV_WORKER_POOL = "MIRAGE_WORKER_POOL"

# The hard time limit kills a child; the visibility timeout must outlast it by this much so a
# job that is still legitimately running is never handed to a second worker.
VISIBILITY_MARGIN_S = 1

_REDIS_SCHEMES = ("redis", "rediss")


def _scheme(url: str) -> str:
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


def broker_transport_options(broker_url: str, visibility_timeout_s: int) -> dict[str, Any]:
    """Transport options for the broker in ``broker_url``.

    Options are per transport: kombu's SQLAlchemy transport passes unknown options straight to
    ``create_engine``, so a Redis-only option like ``visibility_timeout`` would break it.
    """
    scheme = _scheme(broker_url)
    if scheme in _REDIS_SCHEMES:
        # Sweep for abandoned messages often enough that a crashed worker's job comes back
        # soon after its visibility timeout (kombu's default sweep is every ~100 s).
        sweep_s = max(1, min(10, visibility_timeout_s // 10))
        return {
            "visibility_timeout": visibility_timeout_s,
            "unacked_restore_interval": sweep_s,
            "unacked_restore_throttle": 1,
        }
    if scheme in ("sqla", "sqlalchemy", DURABLE_SQLA) and sqlite_path(broker_url) is not None:
        # Nothing else: the stock transport (the bot's, ``celery inspect``) hands every option to
        # create_engine. The durable transport's visibility timeout is set by make_celery.
        return {"connect_args": {"timeout": 30}}  # SQLite busy timeout, seconds
    return {}


def make_celery(settings: WorkerSettings | None = None) -> Celery:
    """A Celery app configured from ``settings`` (the process-wide settings by default).

    The tasks in ``workers.tasks`` are shared tasks, so they attach to every app made here.
    """
    settings = settings or get_settings()
    if settings.task_soft_time_limit_s >= settings.task_time_limit_s:
        raise ValueError("TASK_SOFT_TIME_LIMIT_S must be below TASK_TIME_LIMIT_S")
    if settings.visibility_timeout_s < settings.task_time_limit_s + VISIBILITY_MARGIN_S:
        raise ValueError(
            "VISIBILITY_TIMEOUT_S must exceed TASK_TIME_LIMIT_S, or a running job is redelivered"
        )
    global _sqla_visibility_timeout_s
    _sqla_visibility_timeout_s = float(settings.visibility_timeout_s)

    app = Celery("mirage", broker=worker_broker_url(settings.broker_url), backend=settings.result_backend)
    app.conf.update(
        include=["workers.tasks"],
        task_routes={TASK_SDXL: {"queue": QUEUE_GPU}, TASK_OPENAI: {"queue": QUEUE_API}},
        task_default_queue=QUEUE_GPU,
        # JSON only: pickle from a broker anyone on the network can write to is code execution.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # Reliability (see module docstring).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_deduplicate_successful_tasks=True,
        task_soft_time_limit=settings.task_soft_time_limit_s,
        task_time_limit=settings.task_time_limit_s,
        broker_transport_options=broker_transport_options(settings.broker_url, settings.visibility_timeout_s),
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a worker waits out a broker restart
        # A lost broker connection does not stop a running GPU job: its result is idempotent,
        # so at worst the redelivered copy is deduplicated or recomputed.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # Results: the bot polls AsyncResult(job_id); a result write survives backend blips.
        task_track_started=True,
        result_extended=True,
        result_backend_always_retry=True,
        result_backend_max_retries=10,
        result_expires=max(86400, 4 * settings.visibility_timeout_s),
        database_engine_options=(
            {"connect_args": {"timeout": 30}} if sqlite_path(settings.result_backend) else {}
        ),
        worker_hijack_root_logger=True,
    )
    app.mirage_settings = settings  # type: ignore[attr-defined]  # read by settings_of()
    app.steps["worker"].add(CancelRelay)
    return app


def settings_of(app: Celery) -> WorkerSettings:
    """The settings an app was made with (the process-wide settings for a foreign app)."""
    settings = getattr(app, "mirage_settings", None)
    return settings if isinstance(settings, WorkerSettings) else get_settings()


# --------------------------------------------------------------------------- embedded broker

DURABLE_SQLA = "mirage-sqla"  # the transport alias workers use for ``sqla+`` broker URLs
_sqla_visibility_timeout_s = 1800.0  # set by make_celery; read when a channel opens
_ROW_KEY = "mirage_sqla_row"  # where a delivered message remembers its row
# Transport options that are kombu's, not create_engine's.
_NOT_ENGINE_OPTIONS = frozenset(
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


def _durable_sqla_transport() -> type:
    """Kombu's SQLAlchemy transport with Redis-like acknowledgement semantics.

    The stock transport hides a row when it delivers it and never looks at it again: a worker
    killed mid-task loses its job (acks-late buys nothing), and acknowledged rows pile up
    forever, input images included. This subclass keeps the same tables and message format (so
    the bot publishes with the stock ``sqla+`` transport) but:

    * deletes the row on ack (or on a reject without requeue);
    * makes it visible again on a requeue (worker lost, warm shutdown) instead of inserting a copy;
    * makes hidden rows whose delivery is older than ``visibility_timeout`` visible again, marked
      redelivered, like Redis does for a consumer that died without acknowledging.

    Built lazily so importing this module does not import kombu's SQLAlchemy models.
    """
    from datetime import datetime, timedelta
    from json import dumps, loads

    from kombu.transport import sqlalchemy as sqla
    from kombu.utils.encoding import bytes_to_str
    from sqlalchemy import create_engine, delete, update

    class DurableChannel(sqla.Channel):  # type: ignore[misc,name-defined]
        _last_sweep = 0.0

        def __init__(self, connection: Any, **kwargs: Any) -> None:
            super().__init__(connection, **kwargs)
            self.visibility_timeout = _sqla_visibility_timeout_s

        def _engine_from_config(self) -> Any:
            conninfo = self.connection.client
            options = {k: v for k, v in conninfo.transport_options.items() if k not in _NOT_ENGINE_OPTIONS}
            return create_engine(conninfo.hostname, **options)

        def _sweep(self, queue_id: int) -> None:
            """Give back messages whose consumer vanished more than the visibility timeout ago."""
            now = time.monotonic()
            if now - self._last_sweep < max(1.0, min(10.0, self.visibility_timeout / 10)):
                return
            self._last_sweep = now
            cls = self.message_cls
            cutoff = datetime.now() - timedelta(seconds=self.visibility_timeout)  # naive, like kombu
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
                payload["properties"][_ROW_KEY] = msg.id
                return payload
            finally:
                self.session.commit()

        def _row_of(self, delivery_tag: Any) -> int | None:
            message = self.qos._delivered.get(delivery_tag) if self.qos else None
            return None if message is None else message.properties.get(_ROW_KEY)

        def _execute(self, statement: Any) -> None:
            # Its own transaction: acks may come from pool threads, and the channel's ORM
            # session is not thread-safe.
            engine, _ = self._open()
            with engine.begin() as conn:
                conn.execute(statement)

        def _delete(self, row: int) -> None:
            table = self.message_cls.__table__
            self._execute(delete(table).where(table.c.id == row))

        def basic_ack(self, delivery_tag: Any, multiple: bool = False) -> None:
            row = self._row_of(delivery_tag)
            super().basic_ack(delivery_tag, multiple)
            if row is not None:
                self._execute(
                    delete(self.message_cls.__table__).where(self.message_cls.__table__.c.id == row)
                )

        def basic_reject(self, delivery_tag: Any, requeue: bool = False) -> None:
            row = self._row_of(delivery_tag)
            super().basic_reject(delivery_tag, requeue=requeue)  # requeue goes through _restore
            if row is not None and not requeue:
                self._execute(
                    delete(self.message_cls.__table__).where(self.message_cls.__table__.c.id == row)
                )

        def _restore(self, message: Any) -> None:
            row = message.properties.get(_ROW_KEY)
            if row is None:
                super()._restore(message)
                return
            payload = message.serializable()
            payload["properties"] = {k: v for k, v in payload["properties"].items() if k != _ROW_KEY}
            payload["properties"].setdefault("delivery_info", {})["redelivered"] = True
            table = self.message_cls.__table__
            self._execute(
                update(table)
                .where(table.c.id == row)
                .values(visible=True, payload=dumps(payload), version=table.c.version + 1)
            )

    class Transport(sqla.Transport):  # type: ignore[misc,name-defined]
        Channel = DurableChannel

    return Transport


_DURABLE_TRANSPORT: type | None = None


def durable_sqla_transport() -> type:
    """The durable SQLAlchemy transport class (built once)."""
    global _DURABLE_TRANSPORT
    if _DURABLE_TRANSPORT is None:
        _DURABLE_TRANSPORT = _durable_sqla_transport()
    return _DURABLE_TRANSPORT


def worker_broker_url(broker_url: str) -> str:
    """The URL workers connect with: ``sqla+…`` goes through the durable transport."""
    scheme, sep, rest = broker_url.partition("+")
    if sep and scheme.lower() in ("sqla", "sqlalchemy") and "://" in rest:
        from kombu.transport import TRANSPORT_ALIASES

        TRANSPORT_ALIASES[DURABLE_SQLA] = "workers.celery_app:DurableSQLTransport"
        return f"{DURABLE_SQLA}+{rest}"
    return broker_url


def __getattr__(name: str) -> Any:
    """``DurableSQLTransport`` is built on first access (kombu resolves the alias by name)."""
    if name == "DurableSQLTransport":
        return durable_sqla_transport()
    raise AttributeError(name)


# --------------------------------------------------------------------------- delivery counter


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

    def incr(self, job_id: str) -> int:
        """Increment and return the job's start count."""
        key = f"mirage:deliveries:{job_id}"
        pipe = self._client.pipeline()
        pipe.incr(key)
        pipe.expire(key, self._ttl_s)
        count, _ = pipe.execute()
        return int(count)


class SQLDeliveryCounter(DeliveryCounter):
    """An upserted row per job in the database result backend's database (SQLite or PostgreSQL)."""

    TABLE = "mirage_task_deliveries"

    def __init__(self, sqlalchemy_url: str) -> None:
        """Use the database at ``sqlalchemy_url``; the table is created on first use."""
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
        self._table.create(self._engine, checkfirst=True)
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


class NullDeliveryCounter(DeliveryCounter):
    """No shared store: every start counts as the first, so redeliveries are not bounded."""

    def incr(self, job_id: str) -> int:
        """Always 1."""
        return 1


_counter_lock = threading.Lock()
_counter: tuple[int, DeliveryCounter] | None = None


def make_delivery_counter(settings: WorkerSettings) -> DeliveryCounter:
    """The most reliable counter the configuration offers: Redis, then the SQL result database."""
    ttl_s = max(86400, 4 * settings.visibility_timeout_s)
    for url in (settings.broker_url, settings.result_backend):
        if _scheme(url) in _REDIS_SCHEMES:
            return RedisDeliveryCounter(url, ttl_s)
    if settings.result_backend.startswith("db+"):
        try:
            return SQLDeliveryCounter(settings.result_backend[3:])
        except Exception as exc:
            log.warning("delivery counter unavailable (%s): redeliveries are not bounded", exc)
            return NullDeliveryCounter()
    log.warning("no Redis or SQL result backend: redeliveries are not bounded")
    return NullDeliveryCounter()


def delivery_counter(settings: WorkerSettings) -> DeliveryCounter:
    """The process's counter, made once per process (connections must not cross a fork)."""
    global _counter
    with _counter_lock:
        if _counter is None or _counter[0] != os.getpid():
            _counter = (os.getpid(), make_delivery_counter(settings))
        return _counter[1]


# --------------------------------------------------------------------------- cancellation relay


def cancel_flag(job_id: str) -> Path | None:
    """The flag file that tells a child process its job ``job_id`` was revoked, if relaying is on."""
    folder = os.environ.get(ENV_CANCEL_DIR)
    if not folder or "/" in job_id or job_id in ("", ".", ".."):
        return None
    return Path(folder) / job_id


class CancelRelay(bootsteps.StartStopStep):
    """Relays ``revoke(job_id)`` to the pool child running that job.

    Celery's plain revoke only adds the id to the main process's revoked set; a prefork child
    has its own (reset) copy, so a running job would never notice. Twice a second this step
    writes a flag file for each running request whose id was revoked; ``CancelCheck`` in the
    child looks for it. With the threads pool the revoked set is shared and this is redundant.
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
        if not os.environ.get(ENV_CANCEL_DIR):
            return
        self._thread = threading.Thread(target=self._run, name="mirage-cancel-relay", daemon=True)
        self._thread.start()

    def stop(self, parent: Any) -> None:
        """Stop the relay thread and remove the flag folder."""
        self._stop.set()
        folder = os.environ.get(ENV_CANCEL_DIR)
        if folder:
            shutil.rmtree(folder, ignore_errors=True)

    def _run(self) -> None:
        from celery.worker import state

        while not self._stop.wait(self.interval_s):
            try:
                active = {request.id for request in list(state.active_requests)}
                for job_id in active - self._relayed:
                    if job_id in state.revoked:
                        flag = cancel_flag(job_id)
                        if flag is not None:
                            flag.touch()
                            self._relayed.add(job_id)
                            log.info("job %s revoked while running: asking it to stop", job_id)
                self._relayed &= active
            except Exception:  # never let the relay die; a missed cancel only wastes compute
                log.exception("cancel relay failed")


def _remove_stale_cancel_dirs() -> None:
    """Remove flag folders left by workers that were killed (their pid is gone)."""
    for folder in Path(tempfile.gettempdir()).glob("mirage-cancel-*-*"):
        try:
            pid = int(folder.name.split("-")[2])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue  # not ours, or another user's live worker


@celeryd_init.connect
def _on_worker_init(
    sender: str | None = None, instance: Any = None, options: dict[str, Any] | None = None, **_: Any
) -> None:
    """In the worker's main process, before any child exists: tell children what they serve."""
    prepare_local_storage(settings_of(instance.app) if instance is not None else get_settings())
    options = options or {}
    queues = options.get("queues") or ""
    if isinstance(queues, list | tuple | set):
        queues = ",".join(str(q) for q in queues)
    os.environ[ENV_WORKER_QUEUES] = str(queues)
    pool = options.get("pool") or options.get("pool_cls") or "prefork"  # a class, or a name
    os.environ[ENV_WORKER_POOL] = pool if isinstance(pool, str) else getattr(pool, "__module__", "prefork")
    # The celery CLI turns a BROKER_URL environment variable (the same name as our setting)
    # into CELERY_BROKER_URL, which beats the app's own URL: route that through the durable
    # transport as well.
    cli_url = os.environ.get("CELERY_BROKER_URL")
    if cli_url:
        os.environ["CELERY_BROKER_URL"] = worker_broker_url(cli_url)
    _remove_stale_cancel_dirs()
    folder = Path(tempfile.gettempdir()) / f"mirage-cancel-{os.getpid()}-{int(time.time())}"
    folder.mkdir(parents=True, exist_ok=True)
    os.environ[ENV_CANCEL_DIR] = str(folder)


app = make_celery()
