"""Whether this machine's SDXL worker has its model loaded, for health checks.

The model lives in the worker's child process, which a health check (``docker exec``, another
process) cannot ask. So the engine records the outcome of every load in a small JSON file
(``SDXL_HEALTH_FILE``, by default in the temporary folder, i.e. per container): ``loaded`` with
the model and the loading process's id, or ``failed`` with the reason. :func:`model_loaded` is
true only for a successful load by a process that is still alive.

``python -m workers.sdxl.health`` prints the status and exits 0 when the model is loaded, 1
otherwise. No torch here: the check runs in a fraction of a second.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from workers.presence import process_alive, write_json

ENV_HEALTH_FILE = "SDXL_HEALTH_FILE"
LOADED = "loaded"
FAILED = "failed"
LOADING = "loading"


def health_file() -> Path:
    """Where the status is written: ``SDXL_HEALTH_FILE``, else ``<tmp>/mirage-sdxl-health.json``."""
    configured = os.environ.get(ENV_HEALTH_FILE, "").strip()
    return Path(configured) if configured else Path(tempfile.gettempdir()) / "mirage-sdxl-health.json"


def record(status: str, **facts: Any) -> None:
    """Write the status of this process's model (atomically; a failure to write is not fatal)."""
    path = health_file()
    payload = {"status": status, "pid": os.getpid(), "time": time.time(), **facts}
    try:
        write_json(path, payload)
    except OSError:
        pass  # health reporting must never stop a worker


def health() -> dict[str, Any]:
    """The recorded status, with ``ok`` (model loaded by a live process) and a one-line ``reason``."""
    path = health_file()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {"ok": False, "status": "unknown", "reason": f"no SDXL model load recorded yet ({path})"}
    except (OSError, ValueError) as exc:
        return {"ok": False, "status": "unknown", "reason": f"unreadable health file {path}: {exc}"}
    status = data.get("status")
    pid = data.get("pid")
    if status == LOADED and isinstance(pid, int) and not process_alive(pid):
        return {**data, "ok": False, "reason": f"the process that loaded the model ({pid}) is gone"}
    if status == LOADED:
        return {**data, "ok": True, "reason": f"model {data.get('model')} loaded"}
    reason = data.get("reason") or f"model status: {status}"
    return {**data, "ok": False, "reason": reason}


def model_loaded() -> bool:
    """True when a live worker process on this machine has its SDXL model loaded."""
    return bool(health()["ok"])


def main() -> int:
    """Print the status; exit 0 when the model is loaded, 1 otherwise."""
    state = health()
    print(("OK: " if state["ok"] else "FAIL: ") + str(state["reason"]))
    return 0 if state["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
