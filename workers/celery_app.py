"""The Celery application the workers run: the app factory and the worker's start-up wiring.

``celery -A workers.celery_app worker`` and ``python -m workers worker`` both use the module-level
``app``. Importing this module is cheap and never imports torch: the engines are loaded lazily
inside the worker's child processes (see ``workers.runtime``).

Where things live: the configuration values in ``workers.celery_config``, the embedded broker's
durable transport in ``workers.sql_transport``, redelivery counting in ``workers.redelivery``,
cancellation in ``workers.cancellation``, per-process state (engines, counter) in the
``WorkerRuntime`` each app owns (``workers.runtime``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery, bootsteps
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    celeryd_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)

from workers import metrics, presence
from workers.cancellation import ENV_CANCEL_DIR, CancelRelay, make_cancel_dir, remove_stale_cancel_dirs
from workers.celery_config import celery_config, prepare_local_storage, worker_broker_url
from workers.runtime import (
    ENV_READY_DIR,
    GATED_ENGINES,
    QUEUE_ENGINES,
    RUNTIME_ATTR,
    WorkerRuntime,
    ready_pids,
    runtime_of,
    settings_of,
)
from workers.settings import WorkerSettings, get_settings

log = logging.getLogger(__name__)

# Environment variables the worker's main process sets for its children (inherited across fork).
ENV_WORKER_QUEUES = "MIRAGE_WORKER_QUEUES"
ENV_WORKER_POOL = "MIRAGE_WORKER_POOL"

__all__ = ["ENV_WORKER_POOL", "ENV_WORKER_QUEUES", "app", "make_celery", "runtime_of", "settings_of"]


def make_celery(settings: WorkerSettings | None = None) -> Celery:
    """A Celery app configured from ``settings`` (the process-wide settings by default).

    The app owns a ``WorkerRuntime`` for these settings. The tasks in ``workers.tasks`` are
    shared tasks, so they attach to every app made here. Raises ``ValueError`` for time limits
    that contradict each other.
    """
    settings = settings or get_settings()
    config = celery_config(settings)
    app = Celery("mirage", broker=config["broker_url"], backend=config["result_backend"])
    app.conf.update(config)
    setattr(app, RUNTIME_ATTR, WorkerRuntime(settings))
    app.steps["worker"].add(CancelRelay)
    app.steps["consumer"].add(ModelGate)
    return app


class ModelGate(bootsteps.StartStopStep):
    """Consume a model's queue only once a process of this worker has the model loaded and warm.

    A GPU worker that cannot load SDXL (no weights, no GPU, a typo in ``SDXL_MODEL``) would
    otherwise take jobs off the shared queue and fail them all, while a healthy worker elsewhere
    sits idle. So, with ``WARMUP`` on, the consumer stops consuming the queues of gated engines
    (``workers.runtime.GATED_ENGINES``) right after it starts, before its event loop fetches a
    message, says so at WARNING, and starts consuming them once a pool process marks the engine
    ready (``workers.runtime.mark_ready``, after its warm-up). The warm-up retries a failed load
    every ``MODEL_RETRY_S`` and logs each failure at ERROR, so the queue stays closed until a
    load succeeds. Remote control (ping, revoke) answers meanwhile, so ``/status`` still lists the
    worker. With ``WARMUP`` off the first job loads the model and nothing is gated.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)
    poll_s = 0.5

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.waiting: dict[str, str] = {}  # queue -> engine, until the engine is ready
        self.opened = False
        self._timer: Any = None

    def start(self, c: Any) -> None:
        """Close the gated queues (once) and poll for their engines; reopen them after a restart."""
        if self.opened:
            return  # a consumer restart (lost broker) consumes every selected queue again
        settings = settings_of(c.app)
        if not settings.warmup or not os.environ.get(ENV_READY_DIR):
            return
        if not self.waiting:
            for queue in list(c.task_consumer.queues):
                engine = QUEUE_ENGINES.get(queue.name)
                if engine in GATED_ENGINES:
                    self.waiting[queue.name] = engine
        if not self.waiting:
            return
        for queue in self.waiting:
            # Before the event loop's first consume(): deselected here, it is never consumed.
            c.cancel_task_queue(queue)
        log.warning(
            "not taking jobs from queue %s until the %s model is loaded and warmed up",
            ", ".join(self.waiting),
            "/".join(sorted(set(self.waiting.values()))),
        )
        self._timer = c.timer.call_repeatedly(self.poll_s, self._check, (c,))

    def _check(self, c: Any) -> None:
        ready = {queue: engine for queue, engine in self.waiting.items() if ready_pids(engine)}
        for queue, engine in ready.items():
            c.add_task_queue(queue)
            log.info("the %s model is loaded: taking jobs from queue %s", engine, queue)
            del self.waiting[queue]
        if not self.waiting:
            self.opened = True
            self._cancel_timer()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def stop(self, c: Any) -> None:
        """Stop polling (the consumer is stopping or restarting)."""
        self._cancel_timer()

    def shutdown(self, c: Any) -> None:
        """Stop polling for good."""
        self._cancel_timer()


def _queues_text(queues: Any) -> str:
    if isinstance(queues, list | tuple | set):
        return ",".join(str(q) for q in queues)
    return str(queues or "")


@celeryd_init.connect
def _on_worker_init(
    sender: str | None = None, instance: Any = None, options: dict[str, Any] | None = None, **_: Any
) -> None:
    """In the worker's main process, before any child exists: tell children what they serve."""
    prepare_local_storage(settings_of(instance.app) if instance is not None else get_settings())
    options = options or {}
    os.environ[ENV_WORKER_QUEUES] = _queues_text(options.get("queues"))
    pool = options.get("pool") or options.get("pool_cls") or "prefork"  # a class, or a name
    os.environ[ENV_WORKER_POOL] = pool if isinstance(pool, str) else getattr(pool, "__module__", "prefork")
    # The celery CLI's --broker becomes CELERY_BROKER_URL, which beats the app's own URL: route
    # that through the durable transport as well.
    cli_url = os.environ.get("CELERY_BROKER_URL")
    if cli_url:
        os.environ["CELERY_BROKER_URL"] = worker_broker_url(cli_url)
    remove_stale_cancel_dirs()
    cancel_dir = make_cancel_dir()
    os.environ[ENV_CANCEL_DIR] = str(cancel_dir)
    # Pool processes mark their engine ready here (inside the cancel folder, so a killed
    # worker's markers are swept with it); ModelGate reads them.
    os.environ[ENV_READY_DIR] = str(cancel_dir / ".ready")
    settings = settings_of(instance.app) if instance is not None else get_settings()
    metrics.setup_metrics(settings.worker_metrics_port, os.environ[ENV_WORKER_POOL])


@after_setup_logger.connect
@after_setup_task_logger.connect
def _json_logs(logger: logging.Logger | None = None, **_: Any) -> None:
    """LOG_JSON: Celery's handlers write one JSON object per line (``workers.logconfig``)."""
    from celery import current_app

    settings = settings_of(current_app)
    if settings.log_json:
        from workers.logconfig import use_json_logging

        use_json_logging(settings, [logger] if logger is not None else [])


@worker_process_shutdown.connect
def _child_exits(pid: int | None = None, **_: Any) -> None:
    """A pool child's live gauges go with it."""
    metrics.process_exited(pid or os.getpid())


def _node(sender: Any) -> tuple[Celery, str] | None:
    """The app and node name of a worker signal's sender (the consumer or the worker)."""
    app, name = getattr(sender, "app", None), getattr(sender, "hostname", None)
    return (app, str(name)) if app is not None and name else None


@worker_ready.connect
def _announce(sender: Any = None, **_: Any) -> None:
    """Embedded broker: leave this worker's presence file for /status (it cannot be pinged)."""
    if (node := _node(sender)) is not None:
        app, name = node
        queues = list(getattr(app.amqp.queues, "consume_from", None) or app.amqp.queues)
        presence.announce(str(app.conf.broker_url), name, queues)


@worker_shutdown.connect
def _worker_exits(sender: Any = None, **_: Any) -> None:
    metrics.remove_multiprocess_dir()
    if (node := _node(sender)) is not None:
        presence.withdraw(str(node[0].conf.broker_url), node[1])


app = make_celery()
