"""Cancellation (``workers.cancellation``): flag files relayed from the main process to the child."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from celery.worker import state

from workers.cancellation import (
    ENV_CANCEL_DIR,
    CancelCheck,
    CancelRelay,
    cancel_flag,
    make_cancel_dir,
    remove_stale_cancel_dirs,
)


@pytest.fixture
def flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(ENV_CANCEL_DIR, str(tmp_path))
    return tmp_path


def test_cancel_check_sees_the_relayed_flag(flags: Path) -> None:
    check = CancelCheck("job-c")
    assert check() is False
    (flags / "job-c").touch()  # what CancelRelay writes in the main process
    assert check() is True
    check.cleanup()
    assert not (flags / "job-c").exists()
    assert check() is True  # once cancelled, stays cancelled


def test_cancel_check_sees_the_in_process_revoked_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_CANCEL_DIR, raising=False)  # threads pool: no relay needed
    check = CancelCheck("job-r")
    assert check() is False
    state.revoked.add("job-r")
    try:
        assert check() is True
    finally:
        state.revoked.discard("job-r")


def test_cancel_flag_refuses_path_tricks(flags: Path) -> None:
    assert cancel_flag("../etc") is None
    assert cancel_flag("..") is None
    assert cancel_flag("") is None
    assert cancel_flag("abc") == flags / "abc"


def test_no_flags_outside_a_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_CANCEL_DIR, raising=False)
    assert cancel_flag("abc") is None


def test_the_relay_flags_only_revoked_running_jobs(flags: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    running = [SimpleNamespace(id="job-run"), SimpleNamespace(id="job-revoked")]
    monkeypatch.setattr(state, "active_requests", running)
    state.revoked.add("job-revoked")
    state.revoked.add("job-queued")  # revoked but not running: Celery itself skips it
    try:
        relay = CancelRelay(SimpleNamespace())
        relay.relay_once()
    finally:
        state.revoked.discard("job-revoked")
        state.revoked.discard("job-queued")
    assert sorted(p.name for p in flags.iterdir()) == ["job-revoked"]


def test_flag_folders_of_killed_workers_are_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"mirage-cancel-{dead.pid}-1").mkdir()
    mine = make_cancel_dir(tmp_path)
    assert mine.name.startswith(f"mirage-cancel-{os.getpid()}-")
    remove_stale_cancel_dirs(tmp_path)
    assert not (tmp_path / f"mirage-cancel-{dead.pid}-1").exists()
    assert mine.exists()
