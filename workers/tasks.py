"""The Celery tasks: thin wrappers that turn a job message into a ``TaskOutcome``.

``mirage.sdxl.run`` (queue ``gpu``) and ``mirage.openai.run`` (queue ``api``) each take the
``JobRequest`` as a JSON dict and return a ``TaskOutcome`` dict. Known failures come back as a
``JobError`` in the outcome rather than as an exception, so the bot always gets a typed reason.

A job's life on the worker, in :func:`run_job`: check the message's schema version, validate
it, count the start (bounded redeliveries), check for a cancel, get the warm engine, run it
(pixels, not files), classify SDXL images when ``SAFETY_MODEL`` is set (the bot decides what
to do with the verdicts), then build the result with ``workers.results.build_result``: the grid
is composed and encoded exactly once, here.

Tasks are idempotent: the bot uses ``task_id = job_id``, and the same request (same seed) gives
the same images, so a redelivered message of an unfinished job simply recomputes; a copy of a job
whose outcome (or revoke) is already stored is dropped without running (:func:`admit`). With
``WARMUP`` on, each prefork child loads its engine in ``worker_process_init`` so the first job
does not pay for it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from typing import Any

from celery import Task, shared_task, states
from celery.exceptions import BackendGetMetaError, Ignore, Reject, SoftTimeLimitExceeded
from celery.signals import worker_process_init, worker_ready, worker_shutting_down
from pydantic import ValidationError

from workers import metrics
from workers.cancellation import CancelCheck
from workers.celery_app import ENV_WORKER_POOL, ENV_WORKER_QUEUES
from workers.describe import describe_outcome
from workers.gpu_lock import device_lock
from workers.heartbeat import Heartbeat
from workers.output import EngineOutput
from workers.progress import ProgressSink
from workers.redelivery import over_the_bound
from workers.results import build_result
from workers.runtime import OPENAI, QUEUE_ENGINES, SDXL, WorkerRuntime, device_broken, runtime_of
from workers.schema import (
    SCHEMA_VERSION,
    TASK_DESCRIBE,
    TASK_OPENAI,
    TASK_SDXL,
    ErrorCode,
    JobError,
    JobFailed,
    JobRequest,
    TaskOutcome,
    WorkerError,
)

log = logging.getLogger(__name__)

ENGINE_ERROR_MESSAGE = "The image engine failed on this job. Please try again."
TIMEOUT_MESSAGE = "The job took longer than the time limit and was stopped."
CANCELLED_MESSAGE = "The job was cancelled."
BAD_MESSAGE = "The job message was not valid; the bot and the worker may run different versions."
VERSION_MESSAGE = (
    "The bot and this worker run different Mirage versions (the bot sent job schema version "
    "{sent}, the worker understands version {known}). An admin has to update one of them."
)
TOO_MANY_DELIVERIES = "This job stopped its worker {n} times in a row and was abandoned."

# A job in one of these states has its outcome stored (or was revoked): a copy must not run.
FINISHED_STATES = frozenset({states.SUCCESS, states.FAILURE, states.REVOKED})
# How long a task waits for an unreachable result store before it hands its message back to the
# broker: a Redis restart takes seconds, so this rides one out without draining the queue.
RESULT_STORE_PATIENCE_S = 300.0
RESULT_STORE_RETRY_MAX_S = 5.0  # the longest pause between two tries


def _outcome_error(job_id: str, code: ErrorCode, message: str) -> dict[str, Any]:
    return TaskOutcome(error=JobError(job_id=job_id, code=code, message=message)).model_dump(mode="json")


def version_mismatch(raw: Any) -> str | None:
    """The member-facing reason to refuse ``raw`` when it declares another schema version, else None.

    A message without a version is left to validation (it is malformed, not from another version).
    """
    if not isinstance(raw, dict) or "version" not in raw or raw["version"] == SCHEMA_VERSION:
        return None
    return VERSION_MESSAGE.format(sent=raw["version"], known=SCHEMA_VERSION)


def _count_start(runtime: WorkerRuntime, job_id: str) -> int:
    try:
        return runtime.delivery_counter().incr(job_id)
    except SoftTimeLimitExceeded:
        raise
    except Exception:  # fail open: running a job twice beats losing it
        log.warning("could not count deliveries of job %s", job_id, exc_info=True)
        return 1


def _pause(seconds: float) -> None:
    time.sleep(seconds)


def _stored_state(task: Task, job_id: str) -> str:
    """The job's state in the result store, waiting out an outage of up to ``RESULT_STORE_PATIENCE_S``.

    Raises ``Reject(requeue=True)`` when the store stays unreachable: the message goes back to the
    broker, unacknowledged work rather than a failure nobody can store. Any other read error fails
    open (PENDING): running a job twice beats losing it.
    """
    backend = task.backend
    deadline = time.monotonic() + RESULT_STORE_PATIENCE_S
    pause = 0.5
    while True:
        try:
            return str(backend.get_task_meta(job_id, cache=False).get("status") or states.PENDING)
        except SoftTimeLimitExceeded:
            raise
        except Exception as exc:
            # BackendGetMetaError: Celery's own retries of a retryable error ran out.
            unreachable = isinstance(exc, BackendGetMetaError) or backend.exception_safe_to_retry(exc)
            if not unreachable:
                log.warning("could not read the state of job %s; running it", job_id, exc_info=True)
                return states.PENDING
            if time.monotonic() >= deadline:
                log.error("job %s: the result store is still unreachable; handing the job back", job_id)
                raise Reject(exc, requeue=True) from exc
            log.warning(
                "job %s: the result store is unreachable (%s); waiting for it", job_id, type(exc).__name__
            )
            _pause(pause)
            pause = min(2 * pause, RESULT_STORE_RETRY_MAX_S)


def admit(task: Task, job_id: str) -> None:
    """Let a job's task run: wait for the result store, skip a finished job, then mark it STARTED.

    The job tasks do what ``task_track_started`` would, themselves (they set ``track_started``
    off): Celery writes STARTED before any task code runs, so a result store down at that moment
    failed the task and acknowledged its message (the job refunded, or lost when the failure could
    not be stored either), and a redelivered copy of a finished job overwrote its stored outcome
    before it could be read. Celery itself skips only a redelivered copy of a SUCCESS. Raises
    ``Ignore`` for a job already finished: nothing is stored and the message is acknowledged.
    """
    state = _stored_state(task, job_id)
    if state in FINISHED_STATES:
        log.warning("job %s already ended (%s): not running this copy of its message", job_id, state)
        raise Ignore()
    try:
        meta = {"pid": os.getpid(), "hostname": node_name(task)}  # what Celery's STARTED carries
        task.backend.store_result(job_id, meta, states.STARTED)
    except SoftTimeLimitExceeded:
        raise
    except Exception:  # the store answered a moment ago; the state is cosmetic, the job is not
        log.warning("could not mark job %s started", job_id, exc_info=True)


def run_job(task: Task, kind: str, raw: Any) -> dict[str, Any]:
    """Run one job message on engine ``kind`` and return its ``TaskOutcome`` as a JSON dict."""
    started = time.perf_counter()
    runtime = runtime_of(task.app)
    task_id = str(task.request.id or "")
    job_id = task_id or (str(raw.get("job_id", "")) if isinstance(raw, dict) else "") or "unknown"
    cancel: CancelCheck | None = None
    heartbeat: Heartbeat | None = None
    try:
        mismatch = version_mismatch(raw)
        if mismatch is not None:
            log.error("job %s: %s", job_id, mismatch)
            return _outcome_error(job_id, ErrorCode.ENGINE_UNAVAILABLE, mismatch)
        try:
            request = JobRequest.model_validate(raw)
        except ValidationError as exc:
            # Field names and error types only: the message may carry prompts or images.
            fields = sorted({".".join(map(str, e["loc"])) or "message" for e in exc.errors()})
            log.warning("job %s: invalid message (%s)", job_id, ", ".join(fields))
            return _outcome_error(job_id, ErrorCode.BAD_INPUT, f"{BAD_MESSAGE} ({', '.join(fields)})")
        job_id = request.job_id
        if task_id and task_id != job_id:
            log.warning("task %s carries job %s; reporting under the job id", task_id, job_id)

        admit(task, task_id or job_id)  # Celery keeps the outcome under the task id
        settings = runtime.settings
        sink = ProgressSink(
            task, job_id, min_interval_s=settings.progress_report_interval_s * 0.5, worker=node_name(task)
        )
        heartbeat = Heartbeat(sink, settings.heartbeat_interval_s).start()
        starts = _count_start(runtime, job_id)
        if over_the_bound(starts, settings.max_redeliveries):
            log.error("job %s: start %d exceeds 1 + MAX_REDELIVERIES; not running it", job_id, starts)
            return _outcome_error(job_id, ErrorCode.ENGINE_ERROR, TOO_MANY_DELIVERIES.format(n=starts - 1))
        if starts > 1:
            log.warning("job %s redelivered (start %d): recomputing", job_id, starts)

        cancel = CancelCheck(job_id)
        if cancel():
            return _outcome_error(job_id, ErrorCode.CANCELLED, CANCELLED_MESSAGE)
        engine, load_s = runtime.engine(kind)
        device = str(getattr(engine, "device", "cpu"))
        # SDXL holds its device while it generates and classifies, not while it encodes below
        # (workers.gpu_lock); the OpenAI engine's work is remote.
        held = device_lock(device) if kind == SDXL else contextlib.nullcontext(0.0)
        with held as waited_s:
            if waited_s > 0.5:
                log.info("job %s waited %.1fs for %s", job_id, waited_s, device)
            engine_started = time.perf_counter()
            output = engine.run(request, sink, cancel)
            engine_s = time.perf_counter() - engine_started
            if not isinstance(output, EngineOutput):
                raise TypeError(f"the {kind} engine returned {type(output).__name__}, not EngineOutput")
            safety_started = time.perf_counter()
            checker = runtime.safety_checker(kind, device)
            verdicts = checker.classify(output.images) if checker is not None else None
            safety_s = time.perf_counter() - safety_started
        result = build_result(
            request,
            output,
            started,
            engine_s=engine_s,
            load_s=load_s,
            options=runtime.encode_options,
            safety=verdicts,
            safety_s=safety_s,
        )
        log.info(
            "job %s finished: %s %dx%d %s, generation %.2fs, encode %.2fs, total %.2fs",
            job_id,
            result.layout,
            result.image.width,
            result.image.height,
            result.image.format,
            result.timings.generation_s,
            result.timings.encode_s,
            result.timings.total_s,
        )
        return TaskOutcome(result=result).model_dump(mode="json")
    except (Ignore, Reject):  # not an outcome: Celery acknowledges or requeues the message
        raise
    except WorkerError as exc:
        log.info("job %s failed: %s", job_id, exc.code)
        return _outcome_error(job_id, exc.code, exc.message)
    except SoftTimeLimitExceeded:
        log.warning("job %s hit the soft time limit", job_id)
        return _outcome_error(job_id, ErrorCode.TIMEOUT, TIMEOUT_MESSAGE)
    except Exception as exc:
        log.exception("job %s: engine error", job_id)
        if kind == SDXL and device_broken(exc):
            if runtime.pool_child:
                # The process cannot use its GPU any more. Exiting hands the job back (Celery
                # requeues the message of a lost pool process) and billiard forks a fresh child
                # that loads the model again, instead of this one failing every job it takes.
                log.critical(
                    "job %s: the device is unusable after this error; replacing this process", job_id
                )
                raise SystemExit(1) from None
            log.critical("job %s: the device is unusable after this error; restart this worker", job_id)
        return _outcome_error(job_id, ErrorCode.ENGINE_ERROR, ENGINE_ERROR_MESSAGE)
    finally:
        if heartbeat is not None:  # before Celery stores the final state: no beat may follow it
            heartbeat.stop()
        if cancel is not None:
            cancel.cleanup()


def node_name(task: Task) -> str:
    """The worker node running ``task`` (``mirage-gpu@host``), or this machine's name."""
    return str(getattr(task.request, "hostname", None) or socket.gethostname())


def finish_task(kind: str, outcome: dict[str, Any]) -> dict[str, Any]:
    """Count a task's outcome in the metrics; raise ``JobFailed`` when it carries an error.

    A failed job thus ends its Celery task in FAILURE (as Flower and the result backend show it)
    with a JSON-serialisable exception the bot decodes back into the code and member message.
    """
    metrics.record_outcome(kind, outcome)
    error = outcome.get("error")
    if error:
        raise JobFailed(str(error["code"]), str(error["message"]))
    return outcome


# ``throws``: a JobFailed is an expected outcome, logged by Celery at INFO without a traceback.
# ``track_started`` off: :func:`admit` stores STARTED once the job may run.
@shared_task(bind=True, name=TASK_SDXL, throws=(JobFailed,), track_started=False)
def run_sdxl(self: Task, request: dict[str, Any]) -> dict[str, Any]:
    """Run an SDXL job (``JobRequest`` dict): a ``TaskOutcome`` dict, or ``JobFailed`` raised."""
    return finish_task(SDXL, run_job(self, SDXL, request))


@shared_task(bind=True, name=TASK_OPENAI, throws=(JobFailed,), track_started=False)
def run_openai(self: Task, request: dict[str, Any]) -> dict[str, Any]:
    """Run an OpenAI images job (``JobRequest`` dict): a ``TaskOutcome`` dict, or ``JobFailed`` raised."""
    return finish_task(OPENAI, run_job(self, OPENAI, request))


@shared_task(bind=True, name=TASK_DESCRIBE, throws=(JobFailed,), track_started=False)
def run_describe(self: Task, request: dict[str, Any]) -> dict[str, Any]:
    """/describe (``JobRequest`` of kind DESCRIBE): a ``TaskOutcome`` dict with ``describe`` set,
    or ``JobFailed`` raised, like the image tasks."""
    task_id = str(self.request.id or "")
    if task_id:
        admit(self, task_id)
    outcome = describe_outcome(task_id, request, runtime_of(self.app).settings)
    return finish_task("describe", outcome)


# --------------------------------------------------------------------------- warm-up


def served_engines(runtime: WorkerRuntime) -> list[str]:
    """Engines for the queues this worker consumes (all it can load when it was not told)."""
    queues = [q.strip() for q in os.environ.get(ENV_WORKER_QUEUES, "").split(",") if q.strip()]
    if not queues:
        return list(runtime.loaders)
    return [QUEUE_ENGINES[q] for q in queues if q in QUEUE_ENGINES]


def _warm_in_background(runtime: WorkerRuntime) -> None:
    threading.Thread(
        target=runtime.warm_up,
        args=(served_engines(runtime),),
        kwargs={"retry": True},  # a gated queue stays closed until its model loads
        name="mirage-warmup",
        daemon=True,
    ).start()


@worker_shutting_down.connect
def _on_shutting_down(**_: Any) -> None:
    from celery import current_app

    runtime_of(current_app).shutting_down = True


@worker_process_init.connect
def _warm_child(**_: Any) -> None:
    """Prefork child, just after the fork: the right place to initialise CUDA.

    The load runs in a thread so the child reports "up" to the pool at once. Loading inside the
    initializer itself would need a pool start timeout of minutes (billiard kills a child that
    is silent for ``worker_proc_alive_timeout``) and widens a window in which a shutdown that
    signals the whole process group (systemd, ``timeout``, Ctrl-C) can deadlock billiard. A job
    that arrives meanwhile waits on the engine lock.
    """
    from celery import current_app

    runtime = runtime_of(current_app)
    runtime.pool_child = True
    if runtime.settings.warmup and not runtime.shutting_down:
        _warm_in_background(runtime)


@worker_ready.connect
def _warm_in_process(sender: Any = None, **_: Any) -> None:
    """Threads/solo pool: no children, so warm up in the worker process, off the event loop."""
    if "prefork" in (os.environ.get(ENV_WORKER_POOL) or "prefork"):
        return
    app = getattr(sender, "app", None)
    if app is None:
        from celery import current_app as app
    runtime = runtime_of(app)
    if runtime.settings.warmup:
        _warm_in_background(runtime)
