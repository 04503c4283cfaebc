"""Prometheus metrics of a worker, served on ``WORKER_METRICS_PORT`` (0: off).

| metric | type | labels |
|---|---|---|
| ``mirage_worker_model_loaded`` | gauge (1 loaded, 0 not) | ``engine`` |
| ``mirage_worker_jobs_total`` | counter | ``engine``, ``outcome`` (``success`` or an error code) |
| ``mirage_worker_job_seconds`` | histogram (task start to result) | ``engine`` |
| ``mirage_worker_phase_seconds`` | histogram (the engine's phases) | ``engine``, ``phase`` |
| ``mirage_worker_gpu_memory_bytes`` | gauge (CUDA only) | ``kind`` (allocated, reserved, peak) |

The jobs run in the prefork pool's children while the HTTP server runs in the worker's main
process, so a prefork worker uses prometheus_client's multiprocess mode: :func:`setup_metrics`
(main process, before any child is forked) points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh
temporary folder, where every process writes its values, and serves their sum. That variable
must be set before prometheus_client is first imported, which is why this module imports it
only inside functions. The threads and solo pools record in the serving process itself.

Recording is a no-op unless the worker serves metrics (``MIRAGE_WORKER_METRICS`` is set in
its environment, inherited by the children), so tests and tools that run jobs pay nothing.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

ENV_ENABLED = "MIRAGE_WORKER_METRICS"
ENV_MULTIPROC = "PROMETHEUS_MULTIPROC_DIR"
MULTIPROC_PREFIX = "mirage-metrics-"
SUCCESS = "success"
# Seconds: from a tiny model's phases on a CPU to an SDXL upscale on a slow GPU.
PHASE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
JOB_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0, 1280.0)

_lock = threading.Lock()
_metrics: tuple[int, dict[str, Any]] | None = None  # (pid, metrics) made in this process


def enabled() -> bool:
    """Whether this worker serves metrics (and so whether recording does anything)."""
    return bool(os.environ.get(ENV_ENABLED))


def setup_metrics(port: int, pool: str, *, host: str = "0.0.0.0") -> int | None:
    """Serve this worker's metrics on ``port`` from the calling (main) process; None when 0.

    Call it before the pool starts: a prefork pool's children must inherit the multiprocess
    folder. Returns the port the server listens on.
    """
    if port <= 0:
        return None
    multiprocess = "prefork" in pool
    if multiprocess:
        folder = os.environ.get(ENV_MULTIPROC) or tempfile.mkdtemp(prefix=MULTIPROC_PREFIX)
        os.makedirs(folder, exist_ok=True)
        for name in os.listdir(folder):  # values of an earlier run would be added to ours
            if name.endswith(".db"):
                os.remove(os.path.join(folder, name))
        if "prometheus_client" in sys.modules and ENV_MULTIPROC not in os.environ:
            log.warning(
                "prometheus_client was imported before the metrics were set up; child values may be lost"
            )
        os.environ[ENV_MULTIPROC] = folder
    os.environ[ENV_ENABLED] = "1"
    from prometheus_client import CollectorRegistry, start_http_server

    registry: Any
    if multiprocess:
        from prometheus_client import multiprocess as mp

        registry = CollectorRegistry()
        mp.MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    server, _thread = start_http_server(port, addr=host, registry=registry)
    bound = int(server.server_address[1])
    log.info("worker metrics on port %d (%s)", bound, "multiprocess" if multiprocess else "in process")
    return bound


def remove_multiprocess_dir() -> None:
    """Delete the folder :func:`setup_metrics` made (the worker's main process, at shutdown)."""
    folder = os.environ.get(ENV_MULTIPROC, "")
    if os.path.basename(folder.rstrip("/")).startswith(MULTIPROC_PREFIX):
        shutil.rmtree(folder, ignore_errors=True)


def _get() -> dict[str, Any] | None:
    """This process's metric objects, made on first use (never across a fork)."""
    global _metrics
    if not enabled():
        return None
    pid = os.getpid()
    current = _metrics
    if current is not None and current[0] == pid:
        return current[1]
    with _lock:
        if _metrics is None or _metrics[0] != pid:
            from prometheus_client import Counter, Gauge, Histogram

            made = {
                "model_loaded": Gauge(
                    "mirage_worker_model_loaded",
                    "1 when this worker's engine is loaded and warm, 0 when its load failed.",
                    ["engine"],
                    multiprocess_mode="livemax",
                ),
                "jobs": Counter(
                    "mirage_worker_jobs_total", "Jobs finished by this worker.", ["engine", "outcome"]
                ),
                "job_seconds": Histogram(
                    "mirage_worker_job_seconds",
                    "Task start to result, seconds.",
                    ["engine"],
                    buckets=JOB_BUCKETS,
                ),
                "phase_seconds": Histogram(
                    "mirage_worker_phase_seconds",
                    "Time in each engine phase of a job, seconds.",
                    ["engine", "phase"],
                    buckets=PHASE_BUCKETS,
                ),
                "gpu_memory": Gauge(
                    "mirage_worker_gpu_memory_bytes",
                    "CUDA memory of the engine's process after its last job.",
                    ["kind"],
                    multiprocess_mode="livemax",
                ),
            }
            _metrics = (pid, made)
        return _metrics[1]


def model_loaded(engine: str, loaded: bool) -> None:
    """Record whether ``engine`` is loaded in this process."""
    metrics = _get()
    if metrics is not None:
        metrics["model_loaded"].labels(engine=engine).set(1 if loaded else 0)


def record_outcome(engine: str, outcome: Mapping[str, Any]) -> None:
    """Count one finished job from its ``TaskOutcome`` dict, with its timings when it succeeded."""
    metrics = _get()
    if metrics is None:
        return
    error = outcome.get("error")
    if error:
        metrics["jobs"].labels(engine=engine, outcome=str(error.get("code", "engine_error"))).inc()
        return
    metrics["jobs"].labels(engine=engine, outcome=SUCCESS).inc()
    timings = (outcome.get("result") or {}).get("timings") or {}
    if "total_s" in timings:
        metrics["job_seconds"].labels(engine=engine).observe(float(timings["total_s"]))
    for phase, seconds in (timings.get("phases") or {}).items():
        metrics["phase_seconds"].labels(engine=engine, phase=phase).observe(float(seconds))
    record_gpu_memory()


def record_gpu_memory() -> None:
    """CUDA memory of this process, when it has initialised CUDA (never imports torch itself)."""
    metrics = _get()
    torch = sys.modules.get("torch")
    if metrics is None or torch is None:
        return
    try:
        if not torch.cuda.is_initialized():
            return
        gauge = metrics["gpu_memory"]
        gauge.labels(kind="allocated").set(torch.cuda.memory_allocated())
        gauge.labels(kind="reserved").set(torch.cuda.memory_reserved())
        gauge.labels(kind="peak").set(torch.cuda.max_memory_allocated())
    except Exception:  # metrics must never fail a job
        log.debug("could not read CUDA memory", exc_info=True)


def process_exited(pid: int) -> None:
    """Drop a finished child's live gauges (multiprocess mode only)."""
    if not enabled() or not os.environ.get(ENV_MULTIPROC):
        return
    from prometheus_client import multiprocess as mp

    mp.mark_process_dead(pid)
