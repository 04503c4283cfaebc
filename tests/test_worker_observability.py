"""Running workers for real: the model gate, heartbeats, FAILURE for failed jobs, metrics, JSON logs.

Real ``python -m workers worker`` processes on Redis (their own database numbers, flushed first)
with the tiny SDXL; the client side imports only ``workers.schema`` and Celery, like the bot.
Waits are on events (log lines, states, heartbeats), never fixed sleeps.
"""

from __future__ import annotations

import json
import socket
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from celery import Celery
from celery.result import AsyncResult
from conftest import fresh_redis_db
from workerutil import WorkerProcess, client_app, request, wait_for, wait_outcome

from workers.schema import QUEUE_GPU, TASK_SDXL, ErrorCode, JobFailed, JobKind, Progress

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

OBSERVED_DB = 9  # the module's worker: metrics, JSON logs, fast heartbeats
GATE_DB = 10  # the worker whose model appears late, then is SIGKILLed mid-job
HEARTBEAT_S = 0.3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(model: Path | str, url: str, **extra: str) -> dict[str, str]:
    env = {
        "SDXL_MODEL": str(model),
        "DEVICE": "cpu",
        "BROKER_URL": url,
        "RESULT_BACKEND": url,
        "WARMUP": "1",
        "PROGRESS_REPORT_INTERVAL_S": "0.001",
        "HEARTBEAT_INTERVAL_S": str(HEARTBEAT_S),
        "TASK_SOFT_TIME_LIMIT_S": "90",
        "TASK_TIME_LIMIT_S": "100",
        "VISIBILITY_TIMEOUT_S": "120",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",  # 2 shared cores
    }
    env.update(extra)
    return env


def _send(app: Celery, payload: dict) -> AsyncResult:  # type: ignore[type-arg]
    job_id = str(payload["job_id"])
    return app.send_task(TASK_SDXL, args=[payload], task_id=job_id, queue=QUEUE_GPU, routing_key=QUEUE_GPU)


def _job_id(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:10]}"


def _heartbeat(result: AsyncResult) -> Progress | None:  # type: ignore[type-arg]
    """The job's PROGRESS meta as stored, when it carries a heartbeat."""
    meta = result.backend.get_task_meta(result.id)
    if meta.get("status") != "PROGRESS" or not isinstance(meta.get("result"), dict):
        return None
    progress = Progress.model_validate(meta["result"])
    return progress if progress.heartbeat_at is not None else None


@dataclass
class Observed:
    """The module's worker and a client for it."""

    worker: WorkerProcess
    app: Celery
    url: str
    metrics_port: int


@pytest.fixture(scope="module")
def observed(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    url = fresh_redis_db(OBSERVED_DB)
    port = _free_port()
    log = tmp_path_factory.mktemp("observed") / "worker.log"
    env = _env(tiny_model_dir, url, WORKER_METRICS_PORT=str(port), LOG_JSON="true")
    worker = WorkerProcess(env, log).start()
    app = client_app(url, url)
    try:
        assert wait_for(lambda: "taking jobs from queue gpu" in worker.log() or worker.exited(), 120, 0.1), (
            worker.log()[-4000:]
        )
        yield Observed(worker, app, url, port)
    finally:
        app.close()
        worker.stop()


def _json_lines(text: str) -> list[dict]:  # type: ignore[type-arg]
    lines = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
    return lines


def test_a_failed_job_is_a_failure_with_its_code_and_message(observed: Observed) -> None:
    """A JobError ends the task in FAILURE with JobFailed(code, message), stored as plain JSON."""
    job_id = _job_id("fail")
    corrupt = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB" + "A" * 40
    result = _send(observed.app, request(job_id, JobKind.VARIATION, input_image=corrupt))
    assert wait_for(lambda: result.state == "FAILURE", timeout=120, interval=0.05), result.state
    failed = JobFailed.from_exception(result.get(propagate=False))
    assert failed is not None
    assert failed.error_code is ErrorCode.BAD_INPUT
    assert "could not" in failed.message.lower() or "image" in failed.message.lower()
    raw = json.loads(redis.Redis.from_url(observed.url).get(f"celery-task-meta-{job_id}") or b"{}")
    assert raw["status"] == "FAILURE"
    assert raw["result"]["exc_type"] == "JobFailed" and raw["result"]["exc_module"] == "workers.schema"
    assert raw["result"]["exc_message"] == [ErrorCode.BAD_INPUT.value, failed.message]
    # An expected outcome: Celery logs it without a traceback.
    lines = [r for r in _json_lines(observed.worker.log()) if r.get("job_id") == job_id]
    assert lines and all("exc" not in r for r in lines if r["logger"].startswith("celery"))


def test_json_logs_carry_the_job_id(observed: Observed) -> None:
    job_id = _job_id("json")
    outcome = wait_outcome(_send(observed.app, request(job_id)), timeout=120)
    assert outcome.result is not None, outcome.error
    assert wait_for(lambda: f"job {job_id} finished" in observed.worker.log(), timeout=10)
    records = _json_lines(observed.worker.log())
    finished = [r for r in records if r["message"].startswith(f"job {job_id} finished")]
    assert len(finished) == 1
    assert finished[0]["job_id"] == job_id and finished[0]["level"] == "INFO"
    assert set(finished[0]) >= {"time", "level", "logger", "message"}
    # Every line the worker itself logged is one JSON object (Celery's banner goes to stdout as text).
    logged = [line for line in observed.worker.log().splitlines() if '"level": ' in line]
    assert logged and all(line.startswith("{") for line in logged)


def test_metrics_show_the_model_jobs_and_phases(observed: Observed) -> None:
    job_id = _job_id("metrics")
    assert wait_outcome(_send(observed.app, request(job_id)), timeout=120).result is not None

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{observed.metrics_port}/metrics", timeout=5) as resp:
            return resp.read().decode()

    text = scrape()
    assert 'mirage_worker_model_loaded{engine="sdxl"} 1.0' in text
    success = [line for line in text.splitlines() if line.startswith("mirage_worker_jobs_total{")]
    assert any('outcome="success"' in line and float(line.rsplit(" ", 1)[1]) >= 1 for line in success), (
        success
    )
    assert 'mirage_worker_phase_seconds_count{engine="sdxl",phase="denoise"}' in text
    assert 'mirage_worker_job_seconds_bucket{engine="sdxl",le="+Inf"}' in text


def test_a_running_job_shows_fresh_heartbeats(observed: Observed) -> None:
    job_id = _job_id("beat")
    result = _send(observed.app, request(job_id, steps=40))
    beats: list[float] = []

    def two_beats() -> bool:
        beat = _heartbeat(result)
        if beat is not None and (not beats or beat.heartbeat_at != beats[-1]):
            assert beat.heartbeat_at is not None
            beats.append(beat.heartbeat_at)
            assert beat.worker is not None and beat.worker.startswith("mirage-gpu@")
        return len(beats) >= 3 or result.ready()

    assert wait_for(two_beats, timeout=120, interval=0.02)
    assert len(beats) >= 3 and beats == sorted(beats)
    outcome = wait_outcome(result, timeout=120)
    assert outcome.result is not None, outcome.error
    # The final state stays final: no heartbeat after it.
    assert result.backend.get_task_meta(job_id)["status"] == "SUCCESS"


def test_a_worker_without_its_model_refuses_jobs_until_it_loads_and_its_heartbeat_stops_when_killed(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The gate, end to end: no model, no jobs taken (the job waits in the queue, not failed);
    the model appears, the worker loads it on its next try and runs the job, sending heartbeats;
    SIGKILL, and the heartbeat stops advancing."""
    url = fresh_redis_db(GATE_DB)
    late_model = tmp_path / "model-arrives-later"
    worker = WorkerProcess(_env(late_model, url, MODEL_RETRY_S="0.5"), tmp_path / "gate.log").start()
    app = client_app(url, url)
    job_id = _job_id("gated")
    try:
        worker.wait_ready()
        assert "not taking jobs from queue gpu until the sdxl model is loaded" in worker.log()
        result = _send(app, request(job_id, steps=150))
        # Two failed loads later the job is still queued, untouched.
        assert wait_for(lambda: worker.log().count("warm-up of the sdxl engine failed") >= 2, 120, 0.1)
        failure = next(
            line for line in worker.log().splitlines() if "warm-up of the sdxl engine failed" in line
        )
        assert "ERROR" in failure and "does not exist" in failure and "retrying in 0.5s" in failure
        assert result.state == "PENDING"
        assert redis.Redis.from_url(url).llen(QUEUE_GPU) == 1

        late_model.symlink_to(tiny_model_dir, target_is_directory=True)
        assert wait_for(lambda: "taking jobs from queue gpu" in worker.log(), 120, 0.1), worker.log()[-3000:]
        beats: list[float] = []

        def beating() -> bool:
            beat = _heartbeat(result)
            if beat is not None and beat.heartbeat_at is not None and beat.heartbeat_at not in beats:
                beats.append(beat.heartbeat_at)
            return len(beats) >= 2

        assert wait_for(beating, 120, 0.02), worker.log()[-3000:]
        worker.kill()
        last = _heartbeat(result)
        assert last is not None and last.heartbeat_at is not None
        # Three intervals after the kill, the heartbeat has not moved.
        assert not wait_for(
            lambda: (_heartbeat(result) or last).heartbeat_at != last.heartbeat_at, 3 * HEARTBEAT_S, 0.05
        )
        assert result.state == "PROGRESS"
    finally:
        worker.kill()
        app.close()


async def test_the_bot_refunds_a_job_that_failed_at_a_real_worker_with_its_message(
    redis_url: str, tmp_path: Path, sqlite_url: str
) -> None:
    """Worker → FAILURE(JobFailed) → bot: the member is refunded and told the worker's reason.

    The worker has no model (a folder that does not exist) and serves a private queue, so it
    takes the job and fails it with ENGINE_UNAVAILABLE, ending the task in FAILURE.
    """
    from sqlalchemy import select

    from bot.dispatch import CeleryDispatcher
    from bot.models import JobStatus, Member
    from tests.botutil import bot_harness, run_worker
    from workers.schema import Engine

    with run_worker(tmp_path / "no-model", redis_url, tmp_path) as worker:
        dispatcher = CeleryDispatcher.from_urls(redis_url, redis_url, queues={Engine.SDXL: worker.queue})
        try:
            async with bot_harness(
                tmp_path, sqlite_url, dispatcher, broker_url=redis_url, result_backend=redis_url
            ) as h:
                inter = await h.imagine("a fox in the snow")
                message = await inter.wait_original(lambda m: "❌" in (m.get("content") or ""), timeout=120)
                job = await h.wait_job((await h.job_for(inter)).id, lambda j: j.delivered, timeout=30)
                assert job.status == JobStatus.FAILED
                assert job.error_code == ErrorCode.ENGINE_UNAVAILABLE
                assert job.error is not None and "does not exist" in job.error
                assert "refunded" in message["content"]
                async with h.sessions() as session:
                    member = (
                        await session.scalars(select(Member).where(Member.user_id == h.fake.user.id))
                    ).one()
                assert member.credits_used == 0
        finally:
            await dispatcher.close()
        # The task ended in FAILURE with the schema's exception, not in SUCCESS with an error.
        assert (
            f"Task mirage.sdxl.run[{job.id}] raised expected: JobFailed('engine_unavailable'" in worker.log()
        )
