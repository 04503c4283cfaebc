"""Helpers for tests that run a real ``python -m workers worker`` process.

The client side deliberately imports only ``workers.schema`` (and Celery), like the bot: it sends
tasks by name and reads states, never importing worker code.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from celery import Celery
from celery.result import AsyncResult
from PIL import Image

from workers.schema import GenerationParams, JobError, JobFailed, JobKind, JobRequest, TaskOutcome

REPO = Path(__file__).resolve().parents[1]


def client_app(broker_url: str, result_backend: str) -> Celery:
    """A Celery client configured like the bot's: JSON only, sends by name."""
    app = Celery("mirage-test-client", broker=broker_url, backend=result_backend, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        broker_connection_retry_on_startup=True,
    )
    return app


def png_b64(width: int, height: int, color: tuple[int, int, int] = (200, 40, 40)) -> str:
    """A solid-colour PNG as the base64 text messages carry."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def request(job_id: str, kind: JobKind = JobKind.IMAGINE, *, steps: int = 2, **fields: Any) -> dict[str, Any]:
    """A JSON job message for the tiny model."""
    fields.setdefault("seed", 7)
    return JobRequest(
        job_id=job_id, kind=kind, params=GenerationParams(prompt="a red fox in snow", steps=steps), **fields
    ).model_dump(mode="json")


def decoded(data_b64: str) -> Image.Image:
    """A result image (PNG or WebP, base64) as RGB pixels."""
    with Image.open(io.BytesIO(base64.b64decode(data_b64))) as image:
        image.load()
        return image.convert("RGB")


def wait_outcome(result: AsyncResult, timeout: float) -> TaskOutcome:
    """The task's ``TaskOutcome`` once it finished.

    A job that failed ends its task in FAILURE with ``JobFailed`` (code, member message): that is
    read back into the ``TaskOutcome`` error the bot would build from it. Any other exception is
    raised (the tasks never crash on purpose).
    """
    value = result.get(timeout=timeout, interval=0.1, propagate=False)
    failed = JobFailed.from_exception(value)
    if failed is not None:
        return TaskOutcome(
            error=JobError(job_id=str(result.id), code=failed.error_code, message=failed.message)
        )
    if isinstance(value, BaseException):
        raise value
    return TaskOutcome.model_validate(value)


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def worker_env(model: Path, broker: str, backend: str) -> dict[str, str]:
    """Environment for a worker serving ``model`` with production defaults for reliability."""
    # Production defaults for every reliability setting (visibility timeout, time limits,
    # heartbeat interval); only the model and the CPU thread count are the test's.
    return {
        "SDXL_MODEL": str(model),
        "DEVICE": "cpu",
        "BROKER_URL": broker,
        "RESULT_BACKEND": backend,
        "WARMUP": "1",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }


class WorkerProcess:
    """A real worker in its own process group, logging to a file."""

    def __init__(
        self,
        env: Mapping[str, str],
        log_path: Path,
        *,
        queues: str = "gpu",
        pool: str = "prefork",
        concurrency: int = 1,
        cwd: Path = REPO,
    ) -> None:
        """Prepare (not start) a worker with ``env`` added to this process's environment."""
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.args = [
            sys.executable,
            "-m",
            "workers",
            "worker",
            "--queues",
            queues,
            "--pool",
            pool,
            "--concurrency",
            str(concurrency),
            "--loglevel",
            "INFO",
        ]
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        """Start the worker as the leader of a new process group."""
        self.env.setdefault("PYTHONPATH", str(REPO))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.args,
                cwd=self.cwd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # one group: kill() takes the pool children too
            )
        return self

    def log(self) -> str:
        """Everything the worker wrote so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Block until the worker's consumer is ready (or fail with its log)."""
        if not wait_for(lambda: " ready." in self.log() or self.exited(), timeout, 0.2) or self.exited():
            raise AssertionError(f"worker did not become ready:\n{self.log()[-4000:]}")

    def exited(self) -> bool:
        """Whether the worker process has ended."""
        return self.proc is not None and self.proc.poll() is not None

    def kill(self) -> None:
        """SIGKILL the whole process group: the main process and every pool child at once."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 30.0) -> None:
        """Warm shutdown (SIGTERM to the main process), then SIGKILL if it hangs."""
        if self.proc is None or self.exited():
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        else:
            try:  # children that outlived the main process
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class PrivateRedis:
    """A ``redis-server`` of the test's own on a free port (no persistence), to stop and start again."""

    def __init__(self, directory: Path) -> None:
        """Prepare (not start) a server keeping its files in ``directory``."""
        self.directory = directory
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        """Whether ``redis-server`` is installed here."""
        return shutil.which("redis-server") is not None

    @property
    def url(self) -> str:
        """Database 0 of this server."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        """Start the server and wait until it answers."""
        import redis

        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        if not wait_for(answers, timeout=30, interval=0.05):
            raise AssertionError("the private redis-server did not start")
        return self

    def stop(self) -> None:
        """SIGKILL the server (a crash, not a clean shutdown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
