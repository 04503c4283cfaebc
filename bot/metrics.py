"""Prometheus metrics for the bot: job counters, credits, timings, workers online, queue depth.

Everything lives in one dedicated ``CollectorRegistry`` (never prometheus_client's global one), so
importing this module registers nothing process-wide, tests can swap in a fresh ``Metrics``, and
``/metrics`` shows exactly Mirage's series. It is served on its own port (``METRICS_PORT``,
:func:`start_metrics`; the gallery then has no ``/metrics``) or on the gallery's; either way
``METRICS_TOKEN``, when set, must come as ``Authorization: Bearer <token>`` (compared in
constant time). The gallery is public; the metrics, with their queue depths and failure counts,
need not be.

The bot calls the plain ``record_*`` functions where a job changes state, *after* the transaction
that made the change has committed, so a rolled-back change is never counted:

* ``record_accepted(kind, engine, cost)``: a job row was created and its credits reserved.
* ``record_completed(kind, engine, queue_wait_s, generation_s)``: the job was stored as done.
* ``record_failed(kind, engine, code)``: the job was finalised as failed, timed out or cancelled.
* ``record_refunded(kind, engine, credits)``: its reservation was given back (exactly once).
* ``set_workers_online(n)`` / ``set_queue_depth(queue, depth)``: from whoever polls the broker
  (``/status``, or ``poll_workers`` running in the background).

Labels are bounded: ``kind``, ``engine`` and ``code`` only take the values of ``JobKind``,
``Engine`` and ``ErrorCode`` (anything else is counted as ``other``), so a corrupt row or a new
kind can never create an unbounded number of series. Every known label set starts at zero, so
``increase()`` and ``rate()`` see the first failure after a restart too.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Iterable
from enum import Enum
from typing import Protocol

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder

from bot.settings import BotSettings
from workers.schema import Engine, ErrorCode, JobKind

log = logging.getLogger(__name__)

OTHER = "other"
KINDS: tuple[str, ...] = tuple(kind.value for kind in JobKind)
ENGINES: tuple[str, ...] = tuple(engine.value for engine in Engine)
ERROR_CODES: tuple[str, ...] = tuple(code.value for code in ErrorCode)

# Waiting for a free GPU ranges from nothing to many minutes when the fleet is busy.
QUEUE_WAIT_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, float("inf"))
# An SDXL grid takes seconds on a fast GPU, an upscale or a slow card up to the 20 min task limit.
GENERATION_BUCKETS = (1, 2.5, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 300, 600, 1200, float("inf"))


def _label(value: str | Enum | None, allowed: Iterable[str]) -> str:
    """A label value from a known set: enums by value, anything unknown as ``other``."""
    text = value.value if isinstance(value, Enum) else value
    text = str(text).lower() if text is not None else ""
    return text if text in allowed else OTHER


def _seconds(value: object) -> float | None:
    """A duration worth observing: a finite, non-negative number of seconds, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    seconds = float(value)
    # Clock skew between hosts can make a difference of timestamps slightly negative; a NaN or
    # negative observation would corrupt the histogram's sum, so such a sample is dropped.
    if seconds != seconds or seconds < 0 or seconds == float("inf"):
        return None
    return seconds


class Metrics:
    """Mirage's metric families in one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        """Create every family in ``registry`` (a new one by default) and zero the known series."""
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        # The bot process's own health (CPU, memory, open files, Python version) beside the jobs.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        job_labels = ("kind", "engine")
        self.jobs_accepted = Counter(
            "mirage_jobs_accepted",
            "Jobs accepted (row created, credits reserved).",
            job_labels,
            registry=self.registry,
        )
        self.jobs_completed = Counter(
            "mirage_jobs_completed", "Jobs finished with images stored.", job_labels, registry=self.registry
        )
        self.jobs_failed = Counter(
            "mirage_jobs_failed",
            "Jobs finalised as failed, timed out or cancelled, by error code.",
            (*job_labels, "code"),
            registry=self.registry,
        )
        self.jobs_refunded = Counter(
            "mirage_jobs_refunded", "Jobs whose credits were refunded.", job_labels, registry=self.registry
        )
        self.credits_spent = Counter(
            "mirage_credits_spent",
            "Credits reserved by accepted jobs (before refunds; subtract mirage_credits_refunded).",
            job_labels,
            registry=self.registry,
        )
        self.credits_refunded = Counter(
            "mirage_credits_refunded", "Credits given back by refunds.", job_labels, registry=self.registry
        )
        self.queue_wait = Histogram(
            "mirage_job_queue_wait_seconds",
            "Seconds from a job's release to the broker until a worker started it.",
            ("engine",),
            buckets=QUEUE_WAIT_BUCKETS,
            registry=self.registry,
        )
        self.generation = Histogram(
            "mirage_job_generation_seconds",
            "Seconds a worker spent generating a job's images.",
            ("engine",),
            buckets=GENERATION_BUCKETS,
            registry=self.registry,
        )
        self.workers_online = Gauge(
            "mirage_workers_online", "Workers that answered the last ping.", registry=self.registry
        )
        self.workers_checked = Gauge(
            "mirage_workers_online_updated_timestamp_seconds",
            "Unix time of the last worker ping (alert when it is stale).",
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "mirage_queue_depth", "Messages waiting in a broker queue.", ("queue",), registry=self.registry
        )
        self._zero_known_series()

    def _zero_known_series(self) -> None:
        # A series that first appears at 1 is invisible to increase()/rate(): start them all at 0.
        for kind in (*KINDS, OTHER):
            for engine in (*ENGINES, OTHER):
                for family in (
                    self.jobs_accepted,
                    self.jobs_completed,
                    self.jobs_refunded,
                    self.credits_spent,
                    self.credits_refunded,
                ):
                    family.labels(kind, engine)
                for code in (*ERROR_CODES, OTHER):
                    self.jobs_failed.labels(kind, engine, code)
        for engine in ENGINES:
            self.queue_wait.labels(engine)
            self.generation.labels(engine)

    def record_accepted(self, kind: str, engine: str, cost: int) -> None:
        """A job was accepted and ``cost`` credits reserved for it."""
        labels = (_label(kind, KINDS), _label(engine, ENGINES))
        self.jobs_accepted.labels(*labels).inc()
        if cost > 0:
            self.credits_spent.labels(*labels).inc(cost)

    def record_completed(
        self, kind: str, engine: str, queue_wait_s: float | None, generation_s: float | None
    ) -> None:
        """A job was stored as done; unknown (None) or implausible timings are not observed."""
        kind_label, engine_label = _label(kind, KINDS), _label(engine, ENGINES)
        self.jobs_completed.labels(kind_label, engine_label).inc()
        wait = _seconds(queue_wait_s)
        if wait is not None:
            self.queue_wait.labels(engine_label).observe(wait)
        generation = _seconds(generation_s)
        if generation is not None:
            self.generation.labels(engine_label).observe(generation)

    def record_failed(self, kind: str, engine: str, code: str) -> None:
        """A job was finalised as failed (``code`` is an ``ErrorCode``)."""
        self.jobs_failed.labels(_label(kind, KINDS), _label(engine, ENGINES), _label(code, ERROR_CODES)).inc()

    def record_refunded(self, kind: str, engine: str, credits: int) -> None:
        """A job's reservation of ``credits`` was given back."""
        labels = (_label(kind, KINDS), _label(engine, ENGINES))
        self.jobs_refunded.labels(*labels).inc()
        if credits > 0:
            self.credits_refunded.labels(*labels).inc(credits)

    def set_workers_online(self, n: int) -> None:
        """The number of workers that answered the latest ping."""
        self.workers_online.set(max(0, n))
        self.workers_checked.set(time.time())

    def set_queue_depth(self, queue: str, depth: int | None) -> None:
        """Messages waiting in ``queue``; None (the broker cannot tell) leaves the last value."""
        if depth is not None:
            self.queue_depth.labels(queue).set(max(0, depth))

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition body and its content type (OpenMetrics when ``accept`` asks for it)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


_metrics = Metrics()


def current() -> Metrics:
    """The process-wide metrics (tests replace ``bot.metrics._metrics`` for isolation)."""
    return _metrics


def record_accepted(kind: str, engine: str, cost: int) -> None:
    """A job was accepted and ``cost`` credits reserved (call after the commit)."""
    current().record_accepted(kind, engine, cost)


def record_completed(kind: str, engine: str, queue_wait_s: float | None, generation_s: float | None) -> None:
    """A job was stored as done (call after the commit)."""
    current().record_completed(kind, engine, queue_wait_s, generation_s)


def record_failed(kind: str, engine: str, code: str) -> None:
    """A job was finalised as failed, timed out or cancelled (call after the commit)."""
    current().record_failed(kind, engine, code)


def record_refunded(kind: str, engine: str, credits: int) -> None:
    """A job's credits were refunded (call only when the refund actually happened)."""
    current().record_refunded(kind, engine, credits)


def set_workers_online(n: int) -> None:
    """Workers that answered the latest ping."""
    current().set_workers_online(n)


def set_queue_depth(queue: str, depth: int | None) -> None:
    """Messages waiting in a broker queue."""
    current().set_queue_depth(queue, depth)


def render(accept: str | None = None) -> tuple[bytes, str]:
    """The metrics in Prometheus text format (OpenMetrics if ``accept`` asks): body, content type."""
    return current().render(accept)


METRICS_TOKEN_KEY = web.AppKey("mirage_metrics_token", str)


def authorized(request: web.Request) -> bool:
    """Whether the request carries the configured bearer token (always, when none is configured)."""
    token = request.app.get(METRICS_TOKEN_KEY, "")
    if not token:
        return True
    given = request.headers.get("Authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())


def add_metrics(app: web.Application, settings: BotSettings) -> None:
    """Serve ``/metrics`` on ``app`` (the gallery) unless it has its own port."""
    if settings.metrics_port is not None:
        return
    app[METRICS_TOKEN_KEY] = settings.metrics_token.get_secret_value()
    app.router.add_get("/metrics", metrics_handler)


async def start_metrics(settings: BotSettings) -> web.AppRunner | None:
    """Serve ``/metrics`` alone on ``WEB_HOST:METRICS_PORT``; None when no port is configured."""
    if settings.metrics_port is None:
        return None
    app = web.Application()
    app[METRICS_TOKEN_KEY] = settings.metrics_token.get_secret_value()
    app.router.add_get("/metrics", metrics_handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.web_host, settings.metrics_port).start()
    except BaseException:
        await runner.cleanup()
        raise
    log.info("metrics on http://%s:%s/metrics", settings.web_host, settings.metrics_port)
    return runner


async def metrics_handler(request: web.Request) -> web.Response:
    """``/metrics``: the registry, in the format the scraper's Accept header asks for."""
    if not authorized(request):
        return web.Response(status=401, text="unauthorized", headers={"WWW-Authenticate": "Bearer"})
    body, content_type = render(request.headers.get("Accept"))
    # The content type carries version and charset parameters, which aiohttp's content_type
    # argument rejects, so it goes in as a raw header.
    return web.Response(body=body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})


class _StatusSource(Protocol):
    """The part of ``bot.dispatch.Dispatcher`` the poller needs."""

    async def worker_status(self, ping_timeout: float = ...) -> _WorkerStatus: ...


class _WorkerStatus(Protocol):
    workers: list[str]
    queue_depths: dict[str, int | None]


async def poll_workers_once(source: _StatusSource, ping_timeout: float = 2.0) -> int:
    """Ping the workers once and update the workers-online and queue-depth gauges; returns n."""
    status = await source.worker_status(ping_timeout=ping_timeout)
    set_workers_online(len(status.workers))
    for queue, depth in status.queue_depths.items():
        set_queue_depth(queue, depth)
    return len(status.workers)


async def poll_workers(source: _StatusSource, interval_s: float = 60.0, ping_timeout: float = 2.0) -> None:
    """Keep the worker gauges fresh until cancelled (run it as a background task of the bot).

    ``/status`` only runs when an admin asks, so without this the gauge would go stale. A failed
    poll (broker down) is logged and retried at the next interval; it never ends the loop.
    """
    while True:
        try:
            await poll_workers_once(source, ping_timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("worker poll for metrics failed: %s: %s", type(exc).__name__, exc)
        await asyncio.sleep(interval_s)
