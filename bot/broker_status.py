"""What /status shows of the compute side besides pings: queue depths and, on the embedded
broker, the local worker."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from celery import Celery

from workers.schema import QUEUE_GPU

log = logging.getLogger(__name__)


def local_workers(broker_url: str) -> list[str]:
    """Workers on this machine, for the embedded broker, which carries no pings (no broadcast).

    One machine is the embedded broker's whole world: every worker there leaves a presence file
    while it runs (``workers.presence``), and the SDXL worker's health record (no torch
    involved) says whether its model is loaded.
    """
    from workers.presence import present
    from workers.sdxl.health import health

    sdxl = health()
    found = []
    for worker in present(broker_url):
        line = worker.describe()
        if QUEUE_GPU in worker.queues:
            line += "; SDXL model loaded" if sdxl.get("ok") else "; SDXL model not loaded yet"
        found.append(line)
    return found


def queue_depths(app: Celery, queues: Iterable[str]) -> dict[str, int | None]:
    """Messages waiting in each queue via a passive declare (works on Redis and kombu's virtual
    transports); ``None`` where the broker would not say."""
    depths: dict[str, int | None] = {}
    try:
        with app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1)
            channel = conn.default_channel
            for queue in queues:
                try:
                    depths[queue] = int(channel.queue_declare(queue=queue, passive=True).message_count)
                except Exception:
                    depths[queue] = None
    except Exception:
        log.warning("could not read queue depths from the broker", exc_info=True)
        for queue in queues:
            depths.setdefault(queue, None)
    return depths
