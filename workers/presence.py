"""Which workers run on this machine, for the embedded broker, which cannot carry pings.

The embedded (SQL) transport has no fanout, so ``/status`` cannot ping workers through it. One
machine is that broker's whole world, so each worker's main process leaves a small JSON file in
a ``workers`` folder beside the broker's database when it is ready to consume (its node name,
process id and queues) and removes it when it shuts down. A worker killed outright leaves its
file behind; readers skip a file whose process is gone. Servers (Redis, RabbitMQ) need none of
this: their workers answer pings. No torch, no Celery: the bot reads these files too.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FOLDER = "workers"


@dataclass(frozen=True)
class LocalWorker:
    """A worker process that announced itself on this machine and is still alive."""

    name: str
    pid: int
    queues: tuple[str, ...]
    started_at: float

    def describe(self) -> str:
        """``name (queues gpu, api)``, as /status lists it."""
        return f"{self.name} (queues {', '.join(self.queues) or 'none'})"


def presence_dir(broker_url: str) -> Path | None:
    """The folder of presence files for an embedded broker URL; None for a broker server."""
    from workers.celery_config import sqlite_path  # here: the health check imports this module

    database = sqlite_path(broker_url)  # the embedded broker is a SQLite file; servers have none
    return None if database is None else database.parent / FOLDER


def _file_name(name: str) -> str:
    # Node names look like ``celery@host``; keep the file name to safe characters.
    return "".join(c if c.isalnum() or c in "-_.@" else "_" for c in name) + ".json"


def announce(broker_url: str, name: str, queues: Iterable[str], *, pid: int | None = None) -> Path | None:
    """Record that worker ``name`` (this process) consumes ``queues``; returns the file written.

    Does nothing for a broker server. A failure to write is logged, never raised: presence is
    for ``/status``, and must not stop a worker from working.
    """
    folder = presence_dir(broker_url)
    if folder is None:
        return None
    path = folder / _file_name(name)
    payload = {
        "name": name,
        "pid": os.getpid() if pid is None else pid,
        "queues": sorted(set(queues)),
        "started_at": time.time(),
    }
    try:
        write_json(path, payload)
    except OSError as exc:
        log.warning("could not record this worker's presence in %s: %s", folder, exc)
        return None
    return path


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Replace ``path`` with ``payload`` as JSON in one rename, so a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(payload, default=str))
    tmp.replace(path)


def withdraw(broker_url: str, name: str) -> None:
    """Remove worker ``name``'s file (a clean shutdown)."""
    folder = presence_dir(broker_url)
    if folder is None:
        return
    try:
        (folder / _file_name(name)).unlink(missing_ok=True)
    except OSError as exc:
        log.warning("could not remove this worker's presence file: %s", exc)


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def present(broker_url: str) -> list[LocalWorker]:
    """Workers that announced themselves for this embedded broker and whose process lives, by name."""
    folder = presence_dir(broker_url)
    if folder is None or not folder.is_dir():
        return []
    found: list[LocalWorker] = []
    for path in folder.glob("*.json"):
        try:
            data = json.loads(path.read_text())
            worker = LocalWorker(
                name=str(data["name"]),
                pid=int(data["pid"]),
                queues=tuple(str(q) for q in data.get("queues") or ()),
                started_at=float(data.get("started_at") or 0.0),
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue  # half-written by a crash, or not ours
        if process_alive(worker.pid):
            found.append(worker)
    return sorted(found, key=lambda w: w.name)
