"""One generation at a time per device, across a worker's processes.

A GPU worker started with ``--concurrency 2`` runs two prefork processes, each with its own warm
engine (twice the weights in GPU memory). Each job holds this lock only while it generates (and
while the safety classifier runs), not while its images are encoded and stored: the second
process's next job starts generating as soon as the first one's pixels are out, so encoding
leaves the GPU's critical path, and a job is still acknowledged only after its result is stored.

The lock is ``flock`` on a file named after the device in the temporary directory: held by one
process of the machine at a time, and released by the kernel when its holder dies, a SIGKILL
included. With one process it is never contended and costs a system call.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def lock_path(device: str) -> Path:
    """The lock file of ``device`` (``cuda:0``, ``cpu``…) in the temporary directory."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", device) or "device"
    return Path(tempfile.gettempdir()) / f"mirage-gpu-{name}.lock"


@contextlib.contextmanager
def device_lock(device: str) -> Iterator[float]:
    """Hold ``device`` for this process; yields the seconds spent waiting for it."""
    fd = os.open(lock_path(device), os.O_RDWR | os.O_CREAT, 0o600)
    started = time.perf_counter()
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield time.perf_counter() - started
    finally:
        os.close(fd)  # closing the descriptor releases the flock
