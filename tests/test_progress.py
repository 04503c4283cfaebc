"""Progress reports (``workers.progress.ProgressSink``) stored as the task's PROGRESS state."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from celery.exceptions import SoftTimeLimitExceeded

from workers.progress import PROGRESS_STATE, ProgressSink
from workers.schema import Progress


class Backend:
    def __init__(self, error: BaseException | None = None) -> None:
        self.stored: list[tuple[str, dict[str, Any], str]] = []
        self.error = error

    def store_result(self, task_id: str, meta: dict[str, Any], state: str, **_: Any) -> None:
        if self.error is not None:
            raise self.error
        self.stored.append((task_id, meta, state))


def test_progress_sink_throttles_but_always_reports_the_end() -> None:
    backend = Backend()
    sink = ProgressSink(SimpleNamespace(backend=backend), "job-p", min_interval_s=60)
    for percent in (10, 20, 30, 100):
        sink(Progress(job_id="job-p", percent=percent))
    assert [meta["percent"] for _, meta, _ in backend.stored] == [10, 100]
    assert {(task_id, state) for task_id, _, state in backend.stored} == {("job-p", PROGRESS_STATE)}
    assert sink.reports == 2


def test_progress_sink_survives_a_backend_error() -> None:
    sink = ProgressSink(SimpleNamespace(backend=Backend(ConnectionError("backend down"))), "job-x")
    sink(Progress(job_id="job-x", percent=5))  # logged, not raised: progress is cosmetic
    assert sink.reports == 1


def test_progress_sink_lets_the_time_limit_through() -> None:
    sink = ProgressSink(SimpleNamespace(backend=Backend(SoftTimeLimitExceeded())), "job-t")
    with pytest.raises(SoftTimeLimitExceeded):
        sink(Progress(job_id="job-t", percent=5))


# --------------------------------------------------------------------------- heartbeats


def test_every_report_carries_the_worker_and_the_time_it_was_stored() -> None:
    backend = Backend()
    sink = ProgressSink(
        SimpleNamespace(backend=backend), "job-h", worker="mirage-gpu@box", wall_clock=lambda: 123.5
    )
    sink(Progress(job_id="job-h", percent=40, step=4, total_steps=10))
    _, meta, _ = backend.stored[-1]
    assert (meta["worker"], meta["heartbeat_at"], meta["percent"]) == ("mirage-gpu@box", 123.5, 40)


def test_a_beat_restores_the_latest_report_with_a_fresh_time() -> None:
    backend = Backend()
    now = iter([10.0, 20.0, 30.0])
    sink = ProgressSink(SimpleNamespace(backend=backend), "job-b", worker="w", wall_clock=lambda: next(now))
    sink.beat()  # before any report: 0 %
    sink(Progress(job_id="job-b", percent=60, step=6, total_steps=10))
    sink.beat()
    assert [(m["percent"], m["heartbeat_at"]) for _, m, _ in backend.stored] == [
        (0, 10.0),
        (60, 20.0),
        (60, 30.0),
    ]
    assert sink.beats == 2 and sink.reports == 1


def test_a_closed_sink_stores_nothing_so_the_final_state_stays() -> None:
    backend = Backend()
    sink = ProgressSink(SimpleNamespace(backend=backend), "job-c", worker="w")
    sink.close()
    sink.beat()
    sink(Progress(job_id="job-c", percent=100))
    assert backend.stored == []


def test_the_heartbeat_thread_beats_until_stopped_and_never_after() -> None:
    from workerutil import wait_for

    from workers.heartbeat import Heartbeat

    backend = Backend()
    sink = ProgressSink(SimpleNamespace(backend=backend), "job-t", worker="w")
    heartbeat = Heartbeat(sink, interval_s=0.01).start()
    assert wait_for(lambda: sink.beats >= 3, timeout=10)
    heartbeat.stop()
    stored = len(backend.stored)
    sink.beat()  # what a late beat would do
    assert len(backend.stored) == stored
    assert not heartbeat._thread.is_alive()


def test_the_heartbeat_waits_one_interval_before_its_first_beat() -> None:
    from workers.heartbeat import Heartbeat

    backend = Backend()
    sink = ProgressSink(SimpleNamespace(backend=backend), "job-q", worker="w")
    with Heartbeat(sink, interval_s=60):
        pass
    assert backend.stored == []  # a job shorter than the interval costs no write


def test_a_heartbeat_interval_must_be_positive() -> None:
    from workers.heartbeat import Heartbeat

    with pytest.raises(ValueError):
        Heartbeat(ProgressSink(SimpleNamespace(backend=Backend()), "j"), interval_s=0)
