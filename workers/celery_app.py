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

import os
from typing import Any

from celery import Celery
from celery.signals import celeryd_init

from workers.cancellation import ENV_CANCEL_DIR, CancelRelay, make_cancel_dir, remove_stale_cancel_dirs
from workers.celery_config import celery_config, prepare_local_storage, worker_broker_url
from workers.runtime import RUNTIME_ATTR, WorkerRuntime, runtime_of, settings_of
from workers.settings import WorkerSettings, get_settings

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
    return app


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
    os.environ[ENV_CANCEL_DIR] = str(make_cancel_dir())


app = make_celery()
