"""What a worker process keeps between jobs, owned by its Celery app: engines and the counter.

One :class:`WorkerRuntime` hangs off each app made by ``workers.celery_app.make_celery`` (see
:func:`runtime_of`), so nothing here is module-level state and a test makes a fresh runtime with
a fresh app.

Engines are loaded lazily, once per process, and only in the process that runs the tasks: with
the prefork pool that is the child, after the fork, so CUDA is never initialised in the parent
(a CUDA context does not survive ``fork``). Both the engines and the delivery counter remember
the pid that made them, so a child never uses one inherited across a fork.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from celery.exceptions import SoftTimeLimitExceeded
from PIL import Image

from workers import metrics
from workers.output import EngineOutput
from workers.redelivery import DeliveryCounter, make_delivery_counter
from workers.results import EncodeOptions
from workers.schema import (
    QUEUE_API,
    QUEUE_GPU,
    ErrorCode,
    JobRequest,
    Progress,
    SafetyVerdict,
    WorkerError,
)
from workers.settings import WorkerSettings, get_settings

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)

SDXL = "sdxl"
OPENAI = "openai"
QUEUE_ENGINES = {QUEUE_GPU: SDXL, QUEUE_API: OPENAI}

UNAVAILABLE_MESSAGES = {
    SDXL: "The SDXL engine could not be loaded on this worker. An admin has to check its model.",
    OPENAI: "The OpenAI image engine could not be started on this worker.",
}

RUNTIME_ATTR = "mirage_runtime"


class ImageEngine(Protocol):
    """What both engines provide."""

    def run(
        self,
        request: JobRequest,
        progress: Callable[[Progress], None] | None,
        cancelled: Callable[[], bool] | None,
    ) -> EngineOutput:
        """Run one job and return its images, not yet encoded."""
        ...


class ImageClassifier(Protocol):
    """What the safety classifier provides (``workers.safety.SafetyChecker``)."""

    def classify(self, images: Sequence[Image.Image]) -> list[SafetyVerdict]:
        """One verdict per image, in order."""
        ...


Loader = Callable[[WorkerSettings], ImageEngine]
# Builds the safety classifier for these settings on a device (the engine's), or None if unset.
SafetyLoader = Callable[[WorkerSettings, str], ImageClassifier | None]


def _load_sdxl(settings: WorkerSettings) -> ImageEngine:
    from workers.sdxl.engine import SDXLEngine  # torch/diffusers: only where the job runs

    return SDXLEngine.load(settings)  # type: ignore[return-value]


def _load_openai(settings: WorkerSettings) -> ImageEngine:
    from workers.openai_engine import OpenAIEngine

    return OpenAIEngine.load(settings)


DEFAULT_LOADERS: dict[str, Loader] = {SDXL: _load_sdxl, OPENAI: _load_openai}
# Engines whose results the worker's own classifier checks; OpenAI moderates its images itself.
CLASSIFIED_ENGINES = frozenset({SDXL})


def _load_safety(settings: WorkerSettings, device: str) -> ImageClassifier | None:
    if not settings.safety_model:
        return None
    from workers.safety import SafetyChecker  # transformers: only where a classifier is set

    return SafetyChecker.from_settings(settings, device=device)


class WorkerRuntime:
    """A worker process's engines, delivery counter and shutdown flag, made from its settings."""

    def __init__(
        self,
        settings: WorkerSettings,
        loaders: dict[str, Loader] | None = None,
        safety_loader: SafetyLoader = _load_safety,
    ) -> None:
        """Nothing is loaded or connected until first used."""
        self.settings = settings
        self.loaders: dict[str, Loader] = dict(loaders or DEFAULT_LOADERS)
        self.safety_loader = safety_loader
        self.encode_options = EncodeOptions(settings.image_format, settings.image_compress_level)
        # Set in the worker's main process when it starts shutting down, and inherited by any
        # child the pool forks after that (billiard replaces children that die during a
        # shutdown): such a child must not start loading a model it will never use.
        self.shutting_down = False
        # Set in a prefork pool child (worker_process_init): a process the pool replaces if it exits.
        self.pool_child = False
        self._engines: dict[str, tuple[int, ImageEngine]] = {}
        self._engine_locks: dict[str, threading.Lock] = {}
        self._counter: tuple[int, DeliveryCounter] | None = None
        self._safety: tuple[int, ImageClassifier | None] | None = None
        self._safety_lock = threading.Lock()
        self._lock = threading.Lock()

    def _engine_lock(self, kind: str) -> threading.Lock:
        with self._lock:
            return self._engine_locks.setdefault(kind, threading.Lock())

    def engine(self, kind: str) -> tuple[ImageEngine, float]:
        """The process's engine of ``kind`` and the seconds this call spent loading it (0 if warm).

        The lock makes the threads pool (api worker, -c 8) load it once and then share it:
        OpenAIEngine keeps no per-job state, and its HTTP client and rate limiter are thread-safe.
        Raises ``WorkerError(ENGINE_UNAVAILABLE)`` when loading fails; the next job tries again,
        so a model that appears later (mounted volume, network back) is picked up without a restart.
        """
        pid = os.getpid()
        cached = self._engines.get(kind)
        if cached is not None and cached[0] == pid:
            return cached[1], 0.0
        if kind not in self.loaders:
            raise WorkerError(ErrorCode.ENGINE_UNAVAILABLE, f"This worker has no {kind} engine.")
        with self._engine_lock(kind):
            cached = self._engines.get(kind)
            if cached is not None and cached[0] == pid:
                return cached[1], 0.0
            log.info("loading the %s engine in process %d", kind, pid)
            started = time.perf_counter()
            try:
                engine = self.loaders[kind](self.settings)
            except SoftTimeLimitExceeded:  # the job ran out of time loading: a TIMEOUT, not a bad model
                raise
            except WorkerError:
                metrics.model_loaded(kind, False)
                raise
            except Exception as exc:
                metrics.model_loaded(kind, False)
                log.exception("could not load the %s engine", kind)
                raise WorkerError(ErrorCode.ENGINE_UNAVAILABLE, UNAVAILABLE_MESSAGES[kind]) from exc
            self._engines[kind] = (pid, engine)
            metrics.model_loaded(kind, True)
            log.info("%s engine ready in process %d", kind, pid)
            return engine, time.perf_counter() - started

    def safety_checker(self, kind: str, device: str = "cpu") -> ImageClassifier | None:
        """The process's safety classifier for results of engine ``kind``; None when none applies.

        Loaded on first use (on ``device``, the engine's, so a GPU worker classifies on its GPU)
        and kept. A configured classifier that cannot load raises ``WorkerError``: results are
        then withheld rather than sent unchecked.
        """
        if kind not in CLASSIFIED_ENGINES or not self.settings.safety_model:
            return None
        pid = os.getpid()
        cached = self._safety
        if cached is not None and cached[0] == pid:
            return cached[1]
        with self._safety_lock:
            if self._safety is None or self._safety[0] != pid:
                self._safety = (pid, self.safety_loader(self.settings, device))
            return self._safety[1]

    def delivery_counter(self) -> DeliveryCounter:
        """The process's delivery counter, made once per process (connections must not cross a fork)."""
        pid = os.getpid()
        with self._lock:
            if self._counter is None or self._counter[0] != pid:
                self._counter = (pid, make_delivery_counter(self.settings))
            return self._counter[1]

    def warm_up(
        self, kinds: list[str], *, retry: bool = False, sleep: Callable[[float], Any] | None = None
    ) -> None:
        """Load these engines (and the safety classifier their results need) now.

        Each success is marked ready for the worker's model gate (``workers.celery_app``), which
        only then starts taking that engine's jobs. A failure is logged at ERROR with its reason;
        with ``retry`` a gated engine is tried again every ``MODEL_RETRY_S`` until it loads (or
        the worker shuts down), since its queue stays closed meanwhile. Without ``retry`` the
        first job retries the load.
        """
        wait = sleep or time.sleep
        for kind in kinds:
            while True:
                try:
                    engine, _ = self.engine(kind)
                    self.safety_checker(kind, str(getattr(engine, "device", "cpu")))
                except Exception as exc:
                    reason = exc.message if isinstance(exc, WorkerError) else f"{type(exc).__name__}: {exc}"
                    again = retry and kind in GATED_ENGINES and not self.shutting_down
                    log.error(
                        "warm-up of the %s engine failed: %s; %s",
                        kind,
                        reason.splitlines()[0].rstrip(".") if reason else "unknown error",
                        f"this worker takes no {kind} jobs until it loads; retrying in "
                        f"{self.settings.model_retry_s:g}s"
                        if again
                        else "jobs will retry the load",
                    )
                    if not again:
                        break
                    wait(self.settings.model_retry_s)
                    continue
                mark_ready(kind)
                break


# --------------------------------------------------------------------------- a broken device

# Texts of accelerator errors that leave the process's device context unusable, for torch
# versions that raise them as plain RuntimeError (2.8 and later raise torch.AcceleratorError).
BROKEN_DEVICE_MARKERS = (
    "CUDA error",
    "CUBLAS_STATUS_EXECUTION_FAILED",
    "CUBLAS_STATUS_INTERNAL_ERROR",
    "CUDNN_STATUS_EXECUTION_FAILED",
)


def device_broken(exc: BaseException) -> bool:
    """Whether ``exc``, or an error it was raised from, left this process's accelerator unusable.

    After an illegal memory access, a device-side assert or a GPU that fell off the bus, every
    later CUDA call of the process fails, so its warm engine could only fail every job it is
    given. An out-of-memory error is not one: its memory is freed and the next job may fit.
    """
    torch = sys.modules.get("torch")  # never imported here: no torch, no CUDA error
    out_of_memory = getattr(torch, "OutOfMemoryError", None)
    accelerator_error = getattr(torch, "AcceleratorError", None)
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if out_of_memory is not None and isinstance(current, out_of_memory):
            return False
        if accelerator_error is not None and isinstance(current, accelerator_error):
            return True
        if isinstance(current, RuntimeError) and any(m in str(current) for m in BROKEN_DEVICE_MARKERS):
            return True
        current = current.__cause__ or current.__context__
    return False


# --------------------------------------------------------------------------- readiness

# Engines whose queue a worker opens only once the model is loaded and warmed up (WARMUP on):
# SDXL takes minutes to load, the OpenAI engine none.
GATED_ENGINES = frozenset({SDXL})
ENV_READY_DIR = "MIRAGE_READY_DIR"  # set by the worker's main process, inherited by its children


def _ready_dir() -> Path | None:
    folder = os.environ.get(ENV_READY_DIR)
    return Path(folder) if folder else None


def mark_ready(kind: str) -> None:
    """Tell the worker's main process that this process has engine ``kind`` loaded and warm."""
    folder = _ready_dir()
    if folder is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{kind}-{os.getpid()}").touch()
    except OSError:
        log.warning("could not mark the %s engine ready in %s", kind, folder, exc_info=True)


def ready_pids(kind: str, folder: Path | None = None) -> list[int]:
    """The live processes that marked engine ``kind`` ready in ``folder`` (this worker's by default)."""
    folder = folder or _ready_dir()
    if folder is None or not folder.is_dir():
        return []
    pids: list[int] = []
    for marker in folder.glob(f"{kind}-*"):
        try:
            pid = int(marker.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):
            continue
        except PermissionError:  # exists, another user's
            pass
        pids.append(pid)
    return pids


_ATTACH_LOCK = threading.Lock()  # guards attaching a runtime to a foreign app, not shared data


def runtime_of(app: Celery) -> WorkerRuntime:
    """The runtime ``app`` owns; an app not made by ``make_celery`` gets one from the global settings."""
    runtime: Any = getattr(app, RUNTIME_ATTR, None)
    if isinstance(runtime, WorkerRuntime):
        return runtime
    with _ATTACH_LOCK:
        runtime = getattr(app, RUNTIME_ATTR, None)
        if not isinstance(runtime, WorkerRuntime):
            runtime = WorkerRuntime(get_settings())
            setattr(app, RUNTIME_ATTR, runtime)
        return runtime


def settings_of(app: Celery) -> WorkerSettings:
    """The settings an app was made with (the process-wide settings for a foreign app)."""
    return runtime_of(app).settings
