"""The bot's side of the broker: send tasks by name, read their states, revoke, inspect.

The bot never imports worker code: it builds a bare Celery *client* app from the broker and
result-backend URLs and sends ``mirage.sdxl.run`` / ``mirage.openai.run`` by name with the job id
as the task id, so a redelivered or re-sent task lands on the same result key.

Celery's client API is blocking (kombu publishes synchronously, ``AsyncResult.state`` is a
network round trip), so every call runs in a small dedicated thread pool; the event loop never
waits on the broker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from celery import Celery
from celery.result import AsyncResult
from kombu.exceptions import ContentDisallowed, DecodeError

from bot.broker_status import local_workers, queue_depths
from workers.schema import (
    QUEUE_API,
    QUEUE_GPU,
    TASK_DESCRIBE,
    TASK_OPENAI,
    TASK_SDXL,
    Engine,
    JobFailed,
    JobKind,
    JobRequest,
)

log = logging.getLogger(__name__)

# Celery state names the tracker understands. PROGRESS is the workers' custom state.
PENDING = "PENDING"
RECEIVED = "RECEIVED"
STARTED = "STARTED"
PROGRESS = "PROGRESS"
RETRY = "RETRY"
SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
REVOKED = "REVOKED"
# A stored result the bot cannot decode is the worker's (bad) outcome, not a store outage.
DECODE_ERRORS: tuple[type[Exception], ...] = (DecodeError, ContentDisallowed, UnicodeDecodeError)
FINAL_STATES = frozenset({SUCCESS, FAILURE, REVOKED})
RUNNING_STATES = frozenset({RECEIVED, STARTED, PROGRESS, RETRY})
# What a finished job's stored result is replaced with once the bot has its images (see ``forget``).
FORGOTTEN = {"forgotten": True}

TASK_FOR_ENGINE: dict[Engine, str] = {Engine.SDXL: TASK_SDXL, Engine.OPENAI: TASK_OPENAI}
DEFAULT_QUEUES: dict[Engine, str] = {Engine.SDXL: QUEUE_GPU, Engine.OPENAI: QUEUE_API}

# Speed classes as Celery message priorities. The numbers mean opposite things per broker:
# RabbitMQ delivers the highest number first (queues need ``x-max-priority``, set on both sides
# by ``task_queue_max_priority``); kombu's Redis transport keeps one list per priority step
# (0, 3, 6, 9 by default) and polls the lowest first. The embedded SQL transport is FIFO and
# ignores priorities; there the bot's own release order (turbo, fast, relax) is all there is.
MAX_PRIORITY = 10
AMQP_PRIORITY = {"turbo": 9, "fast": 5, "relax": 1}
REDIS_PRIORITY = {"turbo": 0, "fast": 3, "relax": 6}
AMQP_SCHEMES = frozenset({"amqp", "amqps", "pyamqp"})
REDIS_SCHEMES = frozenset({"redis", "rediss"})


def broker_scheme(broker_url: str) -> str:
    """The transport part of a broker URL (``redis``, ``amqp``, ``sqla``…), lowercased."""
    return broker_url.split("://", 1)[0].split("+", 1)[0].lower()


def task_priority(speed: str | None, broker_url: str) -> int | None:
    """The Celery ``priority`` for a job of this speed class on this broker (None: not supported)."""
    scheme = broker_scheme(broker_url)
    table = AMQP_PRIORITY if scheme in AMQP_SCHEMES else REDIS_PRIORITY if scheme in REDIS_SCHEMES else None
    if table is None:
        return None
    return table.get(speed or "fast", table["fast"])


@dataclass(frozen=True, slots=True)
class TaskState:
    """A snapshot of one task as the result backend sees it.

    ``info`` is the Progress dict for PROGRESS, the TaskOutcome dict for SUCCESS, and a short
    description of the exception for FAILURE (never the exception object: the bot must not need
    the worker's classes to unpickle it).
    """

    job_id: str
    state: str
    info: Any = None

    @property
    def is_final(self) -> bool:
        """Whether the task will not change state again."""
        return self.state in FINAL_STATES


@dataclass(slots=True)
class WorkerStatus:
    """What ``/status`` shows about the compute side."""

    workers: list[str] = field(default_factory=list)
    queue_depths: dict[str, int | None] = field(default_factory=dict)


class Dispatcher(Protocol):
    """What the bot needs from a broker. ``CeleryDispatcher`` is the real one; tests may fake it."""

    async def send(self, request: JobRequest, engine: Engine) -> None:
        """Hand a job to the broker; raises if the broker did not take it."""
        ...

    async def states(self, job_ids: Sequence[str]) -> dict[str, TaskState]:
        """The current state of each task."""
        ...

    async def revoke(self, job_id: str) -> bool | None:
        """Cancel a task (queued ones are dropped, running ones stopped); False if not delivered."""
        ...

    async def forget(self, job_id: str, *, done: bool = True) -> None:
        """Drop a task's stored result: once the bot has saved it (``done``), or before a re-send."""
        ...

    async def worker_status(self, ping_timeout: float = 1.0) -> WorkerStatus:
        """Workers that answer a ping, and the depth of each queue."""
        ...

    async def close(self) -> None:
        """Release connections and threads."""
        ...


class Backoff:
    """A growing pause after failed reads of the result store: 0.5 s doubling up to 30 s.

    Thread-safe enough for its use: one reader thread at a time updates it (the tracker reads
    states once per tick).
    """

    def __init__(self, first_s: float = 0.5, max_s: float = 30.0) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self.delay = 0.0
        self.failures = 0
        self._until = 0.0

    def ready(self, now: float | None = None) -> bool:
        """Whether the pause after the last failure is over."""
        return (time.monotonic() if now is None else now) >= self._until

    def failed(self, now: float | None = None) -> None:
        """Record a failed read: the next one waits twice as long as the last pause."""
        self.failures += 1
        self.delay = min(self.max_s, self.first_s * 2 ** (self.failures - 1))
        self._until = (time.monotonic() if now is None else now) + self.delay

    def succeeded(self) -> None:
        """A read worked: no pause before the next."""
        if self.failures:
            log.info("result store reachable again after %d failed read(s)", self.failures)
        self.failures = 0
        self.delay = 0.0
        self._until = 0.0


def make_celery_client(broker_url: str, result_backend: str) -> Celery:
    """A Celery app used only as a client: it sends tasks by name and reads results.

    JSON only on the wire: the bot never unpickles anything a worker produced.
    """
    app = Celery("mirage-bot", broker=broker_url, backend=result_backend, set_as_current=False)
    transport_options: dict[str, Any] = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5}
    if broker_scheme(broker_url) in AMQP_SCHEMES:
        # Must match the workers' declaration, or RabbitMQ refuses the redeclared queue.
        app.conf.task_queue_max_priority = MAX_PRIORITY
        # Publisher confirms: RabbitMQ acknowledges a persistent message only once it is on disk,
        # so a job is marked queued only when a broker crash can no longer lose it.
        transport_options["confirm_publish"] = True
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_track_started=True,
        broker_connection_retry_on_startup=True,
        # A publish that cannot reach the broker must fail fast so the job stays waiting and the
        # release loop retries it, rather than blocking a thread for minutes.
        broker_connection_timeout=5,
        broker_transport_options=transport_options,
        result_backend_transport_options={"retry_policy": {"timeout": 5.0}},
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5},
    )
    return app


def _describe_failure(result: AsyncResult) -> str | JobFailed:
    """A short, member-safe description of a FAILURE's exception (no traceback).

    A job that failed with a reason (the worker raised ``workers.schema.JobFailed``) comes back
    as that plain-data exception, carrying its error code and member message.
    """
    meta = result.backend.get_task_meta(result.id)
    raw = meta.get("result")
    failed = JobFailed.from_exception(raw)
    if failed is not None:
        return failed
    if isinstance(raw, Mapping):
        args = raw.get("exc_message")
        if raw.get("exc_type") == JobFailed.__name__ and isinstance(args, list | tuple) and len(args) == 2:
            return JobFailed(str(args[0]), str(args[1]))
        exc_type = str(raw.get("exc_type") or "Error")
        return exc_type
    if isinstance(raw, BaseException):
        return type(raw).__name__
    return str(raw or "Error")[:200]


class CeleryDispatcher:
    """The real dispatcher over a Celery client app."""

    def __init__(
        self,
        app: Celery,
        *,
        queues: Mapping[Engine, str] | None = None,
        max_threads: int = 4,
        profile_queues: Mapping[str, str] | None = None,
    ) -> None:
        self.app = app
        self.queues: dict[Engine, str] = dict(DEFAULT_QUEUES)
        if queues:
            self.queues.update(queues)
        # --v / --niji profiles served by workers with another checkpoint (MODEL_PROFILES).
        self.profile_queues: dict[str, str] = dict(profile_queues or {})
        self._executor = ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="celery-client")
        self.backoff = Backoff()

    @classmethod
    def from_urls(
        cls,
        broker_url: str,
        result_backend: str,
        *,
        queues: Mapping[Engine, str] | None = None,
        profile_queues: Mapping[str, str] | None = None,
    ) -> CeleryDispatcher:
        """A dispatcher with its own client app for these URLs."""
        return cls(
            make_celery_client(broker_url, result_backend), queues=queues, profile_queues=profile_queues
        )

    async def _run(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    def queue_for(self, engine: Engine, profile: str | None = None) -> str:
        """The queue a job for ``engine`` goes to: its model profile's queue for SDXL, if mapped."""
        engine = Engine(engine)
        if engine == Engine.SDXL and profile and profile in self.profile_queues:
            return self.profile_queues[profile]
        return self.queues[engine]

    async def send(self, request: JobRequest, engine: Engine) -> None:
        """Publish the task by name with ``task_id = job_id`` on its queue, at its speed's priority."""
        engine = Engine(engine)
        payload = request.model_dump(mode="json")
        queue = self.queue_for(engine, request.params.model_profile)
        priority = task_priority(request.params.speed, str(self.app.conf.broker_url or ""))
        options: dict[str, Any] = {} if priority is None else {"priority": priority}

        def _send() -> None:
            self.app.send_task(
                # /describe has its own task on the engine's queue (a captioner, not a generator).
                TASK_DESCRIBE if request.kind == JobKind.DESCRIBE else TASK_FOR_ENGINE[engine],
                args=[payload],
                task_id=request.job_id,
                queue=queue,
                routing_key=queue,
                **options,
            )

        await self._run(_send)
        log.info("sent job %s (%s) to queue %s, priority %s", request.job_id, request.kind, queue, priority)

    async def states(self, job_ids: Sequence[str]) -> dict[str, TaskState]:
        """Read all states in one executor call (one round trip each, no per-job thread hop).

        A job whose state cannot be read right now (the result store restarting, a network
        blip) is left out, never reported as failed: only a worker's outcome, a revoke, a cancel
        or the job's own timeout fail a job. After such an error the store is left alone for a
        growing pause (:class:`Backoff`), so a down store is not hammered every tick.
        """
        ids = list(job_ids)
        if not ids or not self.backoff.ready():
            return {}

        def _read() -> dict[str, TaskState]:
            out: dict[str, TaskState] = {}
            for job_id in ids:
                result = AsyncResult(job_id, app=self.app)
                try:
                    state = result.state
                    if state == FAILURE:
                        info: Any = _describe_failure(result)
                    elif state in (SUCCESS, PROGRESS, STARTED, RETRY):
                        info = result.info
                    else:
                        info = None
                except DECODE_ERRORS:
                    # The worker stored something the bot cannot read: that is its outcome.
                    log.exception("could not decode the result of task %s", job_id)
                    state, info = FAILURE, "unreadable result"
                except Exception as exc:
                    self.backoff.failed()
                    log.warning(
                        "result store unavailable (%s); reading again in %.1fs",
                        type(exc).__name__,
                        self.backoff.delay,
                    )
                    break  # the store is down for the rest of the batch too
                out[job_id] = TaskState(job_id, state, info)
            else:
                self.backoff.succeeded()
            return out

        return await self._run(_read)

    async def revoke(self, job_id: str) -> bool:
        """Revoke the task for ``job_id`` (a queued one is dropped, a running one stops at its next step).

        Returns False when the broker could not be told (the caller retries before refunding).
        """

        def _revoke() -> None:
            # Plain revoke: the workers relay it to the running child, which stops at the next
            # step (terminating the child would throw away its warm model).
            self.app.control.revoke(job_id)

        try:
            await self._run(_revoke)
        except Exception:
            log.warning("could not revoke task %s", job_id, exc_info=True)
            return False
        return True

    async def forget(self, job_id: str, *, done: bool = True) -> None:
        """Drop a task's stored result (the bot keeps its own copy of the images).

        For a job the bot is ``done`` with a small ``SUCCESS`` marker stays (``result_expires``):
        Redis and the embedded broker hand a message out again after the visibility timeout even
        when the supervisor re-sent it, and workers skip a redelivered task whose result says
        SUCCESS (``worker_deduplicate_successful_tasks``) instead of running it for nobody.
        Before a re-send (``done=False``) nothing stays: the new run must not be skipped.
        """

        def _forget() -> None:
            # Deleted first: key-value backends never overwrite a stored SUCCESS.
            AsyncResult(job_id, app=self.app).forget()
            if done:
                self.app.backend.store_result(job_id, FORGOTTEN, SUCCESS)

        try:
            await self._run(_forget)
        except Exception:
            log.debug("could not forget result %s", job_id, exc_info=True)

    async def worker_status(self, ping_timeout: float = 1.0) -> WorkerStatus:
        """Ping workers (bounded by ``ping_timeout``) and read each queue's length from the broker."""
        queues = sorted(set(self.queues.values()))

        def _inspect() -> WorkerStatus:
            status = WorkerStatus()
            try:
                replies = self.app.control.inspect(timeout=ping_timeout).ping() or {}
                status.workers = sorted(replies)
            except Exception:
                log.warning("worker ping failed", exc_info=True)
            if not status.workers and broker_scheme(str(self.app.conf.broker_url)) == "sqla":
                status.workers = local_workers(str(self.app.conf.broker_url))
            status.queue_depths = queue_depths(self.app, queues)
            return status

        return await self._run(_inspect)

    async def close(self) -> None:
        """Close the broker pool and stop the threads."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        try:
            self.app.close()
        except Exception:
            log.debug("closing the celery client failed", exc_info=True)
