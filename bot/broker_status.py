"""What /status shows of the compute side besides pings: queue depths and, on the embedded
broker, the local worker."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from celery import Celery

log = logging.getLogger(__name__)


def local_workers() -> list[str]:
    """Workers on this machine, for the embedded broker, which carries no pings (no broadcast).

    One machine is the embedded broker's whole world, so the SDXL worker's health record (a
    small file each model load writes; no torch involved) says whether a live worker is there.
    """
    from workers.sdxl.health import health

    state = health()
    return [f"local SDXL worker (pid {state.get('pid')})"] if state.get("ok") else []


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
