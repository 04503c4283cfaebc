"""Worker metrics in one process (the threads pool's way): served, counted, labelled by outcome.

Runs in a subprocess, since prometheus_client's registry is process-wide. The prefork pool's
multiprocess mode is tested on a real worker in ``test_worker_observability.py``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_threads_pool_metrics_are_served_from_the_worker_process() -> None:
    code = textwrap.dedent(
        """
        import os, urllib.request
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        from workers import metrics
        assert not metrics.enabled()
        metrics.record_outcome("openai", {"error": {"code": "bad_input"}})  # off: nothing, no error
        port = metrics.setup_metrics(0, "threads")
        assert port is None  # 0: off
        import socket
        s = socket.socket(); s.bind(("127.0.0.1", 0)); free = s.getsockname()[1]; s.close()
        port = metrics.setup_metrics(free, "threads", host="127.0.0.1")
        metrics.model_loaded("openai", True)
        metrics.record_outcome("openai", {"error": {"code": "content_policy"}})
        metrics.record_outcome("openai", {"result": {"timings": {"total_s": 2.0, "phases": {"api": 1.5}}}})
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        print(text)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert 'mirage_worker_model_loaded{engine="openai"} 1.0' in text
    assert 'mirage_worker_jobs_total{engine="openai",outcome="content_policy"} 1.0' in text
    assert 'mirage_worker_jobs_total{engine="openai",outcome="success"} 1.0' in text
    assert 'mirage_worker_phase_seconds_count{engine="openai",phase="api"} 1.0' in text
    assert 'mirage_worker_job_seconds_sum{engine="openai"} 2.0' in text
    assert "bad_input" not in text  # recorded before metrics were on: dropped
