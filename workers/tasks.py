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
the same images, so a redelivered message simply recomputes. With ``WARMUP`` on, each prefork
child loads its engine in ``worker_process_init`` so the first job does not pay for it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from typing import Any

from celery import Task, shared_task
from celery.exceptions import SoftTimeLimitExceeded
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
from workers.runtime import OPENAI, QUEUE_ENGINES, SDXL, WorkerRuntime, runtime_of
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
    except WorkerError as exc:
        log.info("job %s failed: %s", job_id, exc.code)
        return _outcome_error(job_id, exc.code, exc.message)
    except SoftTimeLimitExceeded:
        log.warning("job %s hit the soft time limit", job_id)
        return _outcome_error(job_id, ErrorCode.TIMEOUT, TIMEOUT_MESSAGE)
    except Exception:
        log.exception("job %s: engine error", job_id)
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
@shared_task(bind=True, name=TASK_SDXL, throws=(JobFailed,))
def run_sdxl(self: Task, request: dict[str, Any]) -> dict[str, Any]:
    """Run an SDXL job (``JobRequest`` dict): a ``TaskOutcome`` dict, or ``JobFailed`` raised."""
    return finish_task(SDXL, run_job(self, SDXL, request))


@shared_task(bind=True, name=TASK_OPENAI, throws=(JobFailed,))
def run_openai(self: Task, request: dict[str, Any]) -> dict[str, Any]:
    """Run an OpenAI images job (``JobRequest`` dict): a ``TaskOutcome`` dict, or ``JobFailed`` raised."""
    return finish_task(OPENAI, run_job(self, OPENAI, request))


@shared_task(bind=True, name=TASK_DESCRIBE, throws=(JobFailed,))
def run_describe(self: Task, request: dict[str, Any]) -> dict[str, Any]:
    """/describe (``JobRequest`` of kind DESCRIBE): a ``TaskOutcome`` dict with ``describe`` set,
    or ``JobFailed`` raised, like the image tasks."""
    outcome = describe_outcome(str(self.request.id or ""), request, runtime_of(self.app).settings)
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
