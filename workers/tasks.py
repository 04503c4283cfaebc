"""The Celery tasks: thin wrappers that turn a job message into a ``TaskOutcome``.

``mirage.sdxl.run`` (queue ``gpu``) and ``mirage.openai.run`` (queue ``api``) each take the
``JobRequest`` as a JSON dict and return a ``TaskOutcome`` dict. Known failures come back as a
``JobError`` in the outcome rather than as an exception, so the bot always gets a typed reason.

Engines are loaded lazily, once per process, and only in the process that runs the tasks: with
the prefork pool that is the child, after the fork, so CUDA is never initialised in the parent
(a CUDA context does not survive ``fork``). With ``WARMUP`` on, each child loads its engine in
``worker_process_init`` so the first job does not pay for it.

Tasks are idempotent: the bot uses ``task_id = job_id``, and the same request (same seed) gives
the same images, so a redelivered message simply recomputes.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any, Protocol

from celery import Task, shared_task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init, worker_ready, worker_shutting_down
from pydantic import ValidationError

from workers.celery_app import (
    ENV_WORKER_POOL,
    ENV_WORKER_QUEUES,
    delivery_counter,
    settings_of,
)
from workers.progress import CancelCheck, ProgressSink
from workers.schema import (
    QUEUE_API,
    QUEUE_GPU,
    TASK_OPENAI,
    TASK_SDXL,
    ErrorCode,
    JobError,
    JobRequest,
    JobResult,
    Progress,
    TaskOutcome,
    WorkerError,
)
from workers.settings import WorkerSettings

log = logging.getLogger(__name__)

SDXL = "sdxl"
OPENAI = "openai"

UNAVAILABLE_MESSAGES = {
    SDXL: "The SDXL engine could not be loaded on this worker. An admin has to check its model.",
    OPENAI: "The DALL-E engine could not be started on this worker.",
}
ENGINE_ERROR_MESSAGE = "The image engine failed on this job. Please try again."
TIMEOUT_MESSAGE = "The job took longer than the time limit and was stopped."
CANCELLED_MESSAGE = "The job was cancelled."
BAD_MESSAGE = "The job message was not valid; the bot and the worker may run different versions."
TOO_MANY_DELIVERIES = "This job stopped its worker {n} times in a row and was abandoned."


class Engine(Protocol):
    """What both engines provide."""

    def run(
        self,
        request: JobRequest,
        progress: Callable[[Progress], None] | None,
        cancelled: Callable[[], bool] | None,
    ) -> JobResult:
        """Run one job."""
        ...


def _load_sdxl(settings: WorkerSettings) -> Engine:
    from workers.sdxl.engine import SDXLEngine  # torch/diffusers: only where the job runs

    return SDXLEngine.load(settings)


def _load_openai(settings: WorkerSettings) -> Engine:
    from workers.openai_engine import OpenAIEngine

    return OpenAIEngine.load(settings)


LOADERS: dict[str, Callable[[WorkerSettings], Engine]] = {SDXL: _load_sdxl, OPENAI: _load_openai}
QUEUE_ENGINES = {QUEUE_GPU: SDXL, QUEUE_API: OPENAI}

# One engine per kind per process. The lock makes the threads pool (api worker, -c 8) load it
# once and then share it: OpenAIEngine keeps no per-job state, and its HTTP client and rate
# limiter are thread-safe. The pid guards against using an engine inherited across a fork.
_engines: dict[str, tuple[int, Engine]] = {}
_engine_locks = {kind: threading.Lock() for kind in LOADERS}


def get_engine(kind: str, settings: WorkerSettings) -> Engine:
    """The process's engine of ``kind``, loaded on first use.

    Raises ``WorkerError(ENGINE_UNAVAILABLE)`` when loading fails; the next job tries again, so
    a model that appears later (mounted volume, network back) is picked up without a restart.
    """
    pid = os.getpid()
    cached = _engines.get(kind)
    if cached is not None and cached[0] == pid:
        return cached[1]
    with _engine_locks[kind]:
        cached = _engines.get(kind)
        if cached is not None and cached[0] == pid:
            return cached[1]
        log.info("loading the %s engine in process %d", kind, pid)
        try:
            engine = LOADERS[kind](settings)
        except WorkerError:
            raise
        except Exception as exc:
            log.exception("could not load the %s engine", kind)
            raise WorkerError(ErrorCode.ENGINE_UNAVAILABLE, UNAVAILABLE_MESSAGES[kind]) from exc
        _engines[kind] = (pid, engine)
        log.info("%s engine ready in process %d", kind, pid)
        return engine


def _outcome_error(job_id: str, code: ErrorCode, message: str) -> dict[str, Any]:
    return TaskOutcome(error=JobError(job_id=job_id, code=code, message=message)).model_dump(mode="json")


def run_job(task: Task, kind: str, raw: Any) -> dict[str, Any]:
    """Validate, count the delivery, run the engine and wrap the result or the failure."""
    task_id = str(task.request.id or "")
    job_id = task_id or (str(raw.get("job_id", "")) if isinstance(raw, dict) else "") or "unknown"
    cancel: CancelCheck | None = None
    try:
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

        settings = settings_of(task.app)
        try:
            starts = delivery_counter(settings).incr(job_id)
        except SoftTimeLimitExceeded:
            raise
        except Exception:  # fail open: running a job twice beats losing it
            log.warning("could not count deliveries of job %s", job_id, exc_info=True)
            starts = 1
        if starts > 1 + settings.max_redeliveries:
            log.error("job %s: start %d exceeds 1 + MAX_REDELIVERIES; not running it", job_id, starts)
            return _outcome_error(job_id, ErrorCode.ENGINE_ERROR, TOO_MANY_DELIVERIES.format(n=starts - 1))
        if starts > 1:
            log.warning("job %s redelivered (start %d): recomputing", job_id, starts)

        cancel = CancelCheck(job_id)
        if cancel():
            return _outcome_error(job_id, ErrorCode.CANCELLED, CANCELLED_MESSAGE)
        engine = get_engine(kind, settings)
        sink = ProgressSink(task, job_id, min_interval_s=settings.progress_interval_s * 0.5)
        result = engine.run(request, sink, cancel)
        if result.job_id != job_id:
            result = result.model_copy(update={"job_id": job_id})
        log.info("job %s finished: %d image(s)", job_id, len(result.images))
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
        if cancel is not None:
            cancel.cleanup()


@shared_task(bind=True, name=TASK_SDXL)
def run_sdxl(self: Task, request: dict[str, Any]) -> dict[str, Any]:
    """Run an SDXL job (``JobRequest`` dict) and return a ``TaskOutcome`` dict."""
    return run_job(self, SDXL, request)


@shared_task(bind=True, name=TASK_OPENAI)
def run_openai(self: Task, request: dict[str, Any]) -> dict[str, Any]:
    """Run an OpenAI images job (``JobRequest`` dict) and return a ``TaskOutcome`` dict."""
    return run_job(self, OPENAI, request)


# --------------------------------------------------------------------------- warm-up


def served_engines() -> list[str]:
    """Engines for the queues this worker consumes (both when it was not told)."""
    queues = [q.strip() for q in os.environ.get(ENV_WORKER_QUEUES, "").split(",") if q.strip()]
    if not queues:
        return list(LOADERS)
    return [QUEUE_ENGINES[q] for q in queues if q in QUEUE_ENGINES]


def warm_up(settings: WorkerSettings) -> None:
    """Load the engines this worker serves now; a failure is logged and retried by the first job."""
    for kind in served_engines():
        try:
            get_engine(kind, settings)
        except Exception:
            log.warning("warm-up of the %s engine failed; jobs will retry the load", kind)


def _warm_in_background(settings: WorkerSettings) -> None:
    threading.Thread(target=warm_up, args=(settings,), name="mirage-warmup", daemon=True).start()


# Set in the worker's main process when it starts shutting down, and inherited by any child the
# pool forks after that (billiard replaces children that die during a shutdown, e.g. when the
# whole process group got SIGTERM): such a child must not start loading a model it will never use.
_shutting_down = False


@worker_shutting_down.connect
def _on_shutting_down(**_: Any) -> None:
    global _shutting_down
    _shutting_down = True


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

    settings = settings_of(current_app)
    if settings.warmup and not _shutting_down:
        _warm_in_background(settings)


@worker_ready.connect
def _warm_in_process(sender: Any = None, **_: Any) -> None:
    """Threads/solo pool: no children, so warm up in the worker process, off the event loop."""
    if "prefork" in (os.environ.get(ENV_WORKER_POOL) or "prefork"):
        return
    app = getattr(sender, "app", None)
    if app is None:
        from celery import current_app as app
    settings = settings_of(app)
    if settings.warmup:
        _warm_in_background(settings)
