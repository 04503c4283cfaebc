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
