"""workers.gpu_lock: one generation per device across processes; the encode runs outside it."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

import workers.tasks as tasks
from tests.test_tasks import FakeCounter, FakeEngine, FakeTask, _job, _settings
from workers.celery_app import make_celery
from workers.gpu_lock import device_lock, lock_path
from workers.runtime import SDXL, runtime_of
from workers.schema import TaskOutcome

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Lock files of this test only (other tests' workers lock the real temporary directory)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    yield tmp_path


def held_elsewhere(device: str) -> bool:
    """Whether another open file description holds the device's lock (as another process would)."""
    fd = os.open(lock_path(device), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_lock_files_are_per_device_and_safe_names(private_tmp: Path) -> None:
    assert lock_path("cuda:0") == private_tmp / "mirage-gpu-cuda_0.lock"
    assert lock_path("cuda:0") != lock_path("cuda:1")
    assert lock_path("../etc/x").parent == private_tmp


def test_a_process_holding_the_device_excludes_others_until_it_dies(private_tmp: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from workers.gpu_lock import device_lock\n"
            "with device_lock('cuda:0'):\n    print('held', flush=True); sys.stdin.read()",
        ],
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(private_tmp)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert held_elsewhere("cuda:0") and not held_elsewhere("cuda:1")
        holder.send_signal(signal.SIGKILL)  # a worker killed mid-job frees its device
        holder.wait(timeout=60)
        assert not held_elsewhere("cuda:0")
        with device_lock("cuda:0") as waited:
            assert waited >= 0 and held_elsewhere("cuda:0")
        assert not held_elsewhere("cuda:0")
    finally:
        holder.kill()
        holder.wait(timeout=60)


class LockCheckingEngine(FakeEngine):
    """A fake SDXL engine that records whether its device was held while it generated."""

    device = "cuda:7"

    def __init__(self) -> None:
        super().__init__()
        self.held_while_running: list[bool] = []

    def run(self, request: Any, progress: Any, cancelled: Any) -> Any:
        self.held_while_running.append(held_elsewhere(self.device))
        return super().run(request, progress, cancelled)


@pytest.fixture
def app() -> Iterator[Celery]:
    app = make_celery(_settings())
    yield app
    app.close()


def test_a_job_holds_its_device_to_generate_and_releases_it_to_encode(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = runtime_of(app)
    engine = LockCheckingEngine()
    runtime.loaders[SDXL] = lambda settings: engine
    monkeypatch.setattr(runtime, "delivery_counter", FakeCounter)
    held_while_encoding: list[bool] = []
    real_build = tasks.build_result

    def recording_build(*args: Any, **kwargs: Any) -> Any:
        held_while_encoding.append(held_elsewhere(engine.device))
        return real_build(*args, **kwargs)

    monkeypatch.setattr(tasks, "build_result", recording_build)
    raw = tasks.run_job(FakeTask(app, "job-lock"), SDXL, _job("job-lock"))  # type: ignore[arg-type]
    assert TaskOutcome.model_validate(raw).result is not None
    assert engine.held_while_running == [True] and held_while_encoding == [False]
    assert not held_elsewhere(engine.device)
