"""End to end: a real ``python -m workers worker`` process, the tiny SDXL, a real broker.

The client here is configured like the bot's (JSON only, tasks sent by name, ``task_id = job_id``)
and imports nothing from the worker but ``workers.schema``. Redis tests use their own database
numbers (flushed first), so they never see another test's queues or results.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from celery import Celery
from conftest import fresh_redis_db
from workerutil import (
    REPO,
    PrivateRedis,
    WorkerProcess,
    client_app,
    decoded,
    png_b64,
    request,
    wait_for,
    wait_outcome,
)

from workers.schema import (
    QUEUE_API,
    QUEUE_GPU,
    TASK_OPENAI,
    TASK_SDXL,
    ErrorCode,
    JobKind,
    Layout,
    Progress,
    TaskOutcome,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

MODULE_DB = 11  # the shared worker's broker + results
CRASH_DB = 12  # the SIGKILL test's own broker + results
API_DB = 13  # the threads-pool api worker

# Long enough to be caught mid-run (every step reports progress), short enough to redo quickly
# on a busy 2-core CPU.
LONG_STEPS = 12


def _worker_env(model: Path, broker: str, backend: str, **extra: str) -> dict[str, str]:
    env = {
        "SDXL_MODEL": str(model),
        "DEVICE": "cpu",
        "BROKER_URL": broker,
        "RESULT_BACKEND": backend,
        "WARMUP": "1",
        "PROGRESS_REPORT_INTERVAL_S": "0.001",  # report every step, so PROGRESS is seen several times
        "TASK_SOFT_TIME_LIMIT_S": "90",
        "TASK_TIME_LIMIT_S": "100",
        "VISIBILITY_TIMEOUT_S": "120",
        "HF_HUB_OFFLINE": "1",
        # One thread: on a shared 2-core box, two torch threads per worker oversubscribe the CPU
        # and a 12-step grid goes from ~2 s to over 10 s.
        "OMP_NUM_THREADS": "1",
    }
    env.update(extra)
    return env


def _send(app: Celery, payload: dict, job_id: str | None = None):  # type: ignore[no-untyped-def]
    job_id = job_id or str(payload.get("job_id") or uuid.uuid4())
    return app.send_task(TASK_SDXL, args=[payload], task_id=job_id, queue=QUEUE_GPU, routing_key=QUEUE_GPU)


def _job_id(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:10]}"


def _finished_lines(text: str, job_id: str) -> int:
    """How many times a worker log says the job's engine run finished (the completion marker)."""
    return text.count(f"job {job_id} finished")


@dataclass
class Running:
    """A started worker and a client for it."""

    worker: WorkerProcess
    app: Celery
    broker: str


@pytest.fixture(scope="module")
def redis_worker(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """One prefork worker (concurrency 1) on Redis, shared by the tests that do not kill it."""
    url = fresh_redis_db(MODULE_DB)
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    worker = WorkerProcess(_worker_env(tiny_model_dir, url, url), log).start()
    app = client_app(url, url)
    try:
        worker.wait_ready()
        yield Running(worker, app, url)
    finally:
        app.close()
        worker.stop()


def test_grid_returns_one_composed_image_of_four_tiny_model_tiles(redis_worker: Running) -> None:
    job_id = _job_id("grid")
    outcome = wait_outcome(_send(redis_worker.app, request(job_id)), timeout=120)
    assert outcome.error is None, outcome.error
    assert outcome.result is not None
    assert outcome.result.job_id == job_id
    assert outcome.result.layout is Layout.GRID
    assert (outcome.result.tile_width, outcome.result.tile_height) == (64, 64)
    assert decoded(outcome.result.image.data_b64).size == (128, 128)


def test_torch_is_loaded_only_in_the_pool_child(redis_worker: Running) -> None:
    # CUDA cannot survive a fork: the main process must never load torch, only its children.
    proc = redis_worker.worker.proc
    assert proc is not None
    wait_outcome(_send(redis_worker.app, request(_job_id("maps"))), timeout=120)
    maps = Path(f"/proc/{proc.pid}/maps")
    if not maps.exists():
        pytest.skip("no /proc on this system")
    assert "libtorch" not in maps.read_text()
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert any("libtorch" in Path(f"/proc/{pid}/maps").read_text() for pid in children)


def test_upscale_returns_one_image_at_twice_the_size(redis_worker: Running) -> None:
    job_id = _job_id("upscale")
    payload = request(job_id, JobKind.UPSCALE, count=1, input_image=png_b64(64, 64))
    outcome = wait_outcome(_send(redis_worker.app, payload), timeout=120)
    assert outcome.error is None, outcome.error
    assert outcome.result is not None
    assert outcome.result.layout is Layout.SINGLE
    assert decoded(outcome.result.image.data_b64).size == (128, 128)


def test_progress_is_reported_while_a_multi_step_job_runs(redis_worker: Running) -> None:
    job_id = _job_id("progress")
    result = _send(redis_worker.app, request(job_id, steps=8))
    seen: list[Progress] = []

    def finished() -> bool:
        # One read of the stored meta: ``result.state`` then ``result.info`` are two reads, and the
        # task can finish between them (a SUCCESS outcome read as if it were the PROGRESS meta).
        meta = result.backend.get_task_meta(result.id)
        state = meta["status"]
        if state == "PROGRESS":
            info = Progress.model_validate(meta["result"])
            if not seen or seen[-1] != info:
                seen.append(info)
        return state in ("SUCCESS", "FAILURE")

    assert wait_for(finished, timeout=120, interval=0.02)
    outcome = TaskOutcome.model_validate(result.get(timeout=5))
    assert outcome.result is not None, outcome.error
    assert len(seen) > 1, seen
    assert all(p.job_id == job_id for p in seen)
    assert seen[-1].percent >= seen[0].percent


def test_corrupt_input_image_is_bad_input(redis_worker: Running) -> None:
    job_id = _job_id("corrupt")
    corrupt = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB" + "A" * 40  # a PNG header, then nonsense
    payload = request(job_id, JobKind.VARIATION, input_image=corrupt)
    outcome = wait_outcome(_send(redis_worker.app, payload), timeout=120)
    assert outcome.result is None
    assert outcome.error is not None
    assert outcome.error.code is ErrorCode.BAD_INPUT
    assert outcome.error.job_id == job_id


def test_a_request_of_another_schema_version_is_refused(redis_worker: Running) -> None:
    job_id = _job_id("version")
    outcome = wait_outcome(_send(redis_worker.app, {**request(job_id), "version": 1}), timeout=60)
    assert outcome.error is not None
    assert outcome.error.code is ErrorCode.ENGINE_UNAVAILABLE
    assert "different Mirage versions" in outcome.error.message
    assert _finished_lines(redis_worker.worker.log(), job_id) == 0


def test_invalid_message_is_bad_input(redis_worker: Running) -> None:
    job_id = _job_id("invalid")
    outcome = wait_outcome(_send(redis_worker.app, {"job_id": job_id, "kind": "imagine"}), timeout=60)
    assert outcome.error is not None
    assert outcome.error.code is ErrorCode.BAD_INPUT
    assert outcome.error.job_id == job_id


def test_an_exception_inside_diffusers_is_engine_error_with_a_safe_message(redis_worker: Running) -> None:
    # A denoise strength so small that img2img is left with zero timesteps: diffusers itself
    # fails on an empty batch of timesteps (a RuntimeError about tensor sizes).
    job_id = _job_id("engine-error")
    payload = request(job_id, JobKind.VARIATION, input_image=png_b64(64, 64), strength=1e-9)
    outcome = wait_outcome(_send(redis_worker.app, payload), timeout=120)
    assert outcome.error is not None
    assert outcome.error.code is ErrorCode.ENGINE_ERROR
    assert "tensor" not in outcome.error.message.lower()  # no internals shown to members
    assert "Traceback" in redis_worker.worker.log()  # ... but logged for admins


def test_same_request_gives_the_same_images(redis_worker: Running) -> None:
    payload = request(_job_id("same"), seed=1234)
    first = wait_outcome(_send(redis_worker.app, payload, _job_id("same-a")), timeout=120)
    second = wait_outcome(_send(redis_worker.app, payload, _job_id("same-b")), timeout=120)
    assert first.result is not None and second.result is not None
    assert first.result.image.data_b64 == second.result.image.data_b64


def test_revoking_a_running_job_cancels_it(redis_worker: Running) -> None:
    job_id = _job_id("cancel")
    result = _send(redis_worker.app, request(job_id, steps=150))
    assert wait_for(lambda: result.state == "PROGRESS", timeout=60, interval=0.05)
    redis_worker.app.control.revoke(job_id)  # what the bot calls: plain revoke, no terminate
    started = time.monotonic()
    outcome = wait_outcome(result, timeout=60)
    assert outcome.error is not None, "the job ran to the end"
    assert outcome.error.code is ErrorCode.CANCELLED
    assert time.monotonic() - started < 20
    # The child survived (no terminate): the next job runs on the warm engine.
    follow = wait_outcome(_send(redis_worker.app, request(_job_id("after-cancel"))), timeout=60)
    assert follow.result is not None


def test_a_job_past_its_redelivery_bound_is_not_run_again(redis_worker: Running) -> None:
    job_id = _job_id("poison")
    # As if the job had already crashed its worker 1 + MAX_REDELIVERIES (3) times.
    redis.Redis.from_url(redis_worker.broker).set(f"mirage:deliveries:{job_id}", 4)
    outcome = wait_outcome(_send(redis_worker.app, request(job_id)), timeout=60)
    assert outcome.error is not None
    assert outcome.error.code is ErrorCode.ENGINE_ERROR
    assert _finished_lines(redis_worker.worker.log(), job_id) == 0


def _crash_and_recover(tiny_model_dir: Path, tmp: Path, broker: str, backend: str) -> tuple[str, Celery, str]:
    """Start a worker, SIGKILL its process group mid-job, start another; return the job's logs."""
    env = _worker_env(
        tiny_model_dir,
        broker,
        backend,
        # Redelivery of an unacknowledged message waits for the visibility timeout; keep it short
        # and the time limits below it, as production keeps them (1260 s < 1800 s). The limits
        # still leave a 12-step tiny grid (~2 s, ~10 s on a crowded 2-core box) room. Recovery at
        # default settings (the bot's supervisor) is tests/reliability/test_worker_crash.py's;
        # this test proves the transport's own redelivery, which needs no long wait.
        VISIBILITY_TIMEOUT_S="20",
        TASK_SOFT_TIME_LIMIT_S="14",
        TASK_TIME_LIMIT_S="17",
        # A device lock of their own: the machine-wide one (workers/gpu_lock.py) would make this
        # job queue behind other test modules' generations, and the wait counts against 14 s.
        TMPDIR=str(tmp),
    )
    app = client_app(broker, backend)
    first = WorkerProcess(env, tmp / "first.log").start()
    job_id = _job_id("crash")
    try:
        first.wait_ready()
        # The job must be caught running, not waiting for the warm-up's model load.
        assert wait_for(lambda: "sdxl engine ready" in first.log(), timeout=120, interval=0.1), first.log()[
            -3000:
        ]
        result = _send(app, request(job_id, steps=LONG_STEPS))
        assert wait_for(lambda: result.state == "PROGRESS", timeout=60, interval=0.02), first.log()[-3000:]
        first.kill()
        assert result.state == "PROGRESS"  # it really died mid-job
    finally:
        first.kill()
    second = WorkerProcess(env, tmp / "second.log").start()
    try:
        outcome = wait_outcome(result, timeout=180)
        assert outcome.result is not None, outcome.error
        assert outcome.result.layout is Layout.GRID
        wait_for(lambda: f"{job_id}] succeeded" in second.log(), timeout=10)
    finally:
        second.stop()
    logs = first.log() + second.log()
    return job_id, app, logs


def test_a_job_survives_its_worker_being_sigkilled_redis(tiny_model_dir: Path, tmp_path: Path) -> None:
    url = fresh_redis_db(CRASH_DB)
    job_id, app, logs = _crash_and_recover(tiny_model_dir, tmp_path, url, url)
    try:
        assert _finished_lines(logs, job_id) == 1  # completed exactly once
        assert "redelivered (start 2)" in logs
        assert int(redis.Redis.from_url(url).get(f"mirage:deliveries:{job_id}") or 0) == 2
    finally:
        app.close()


def _embedded_urls(tmp: Path) -> tuple[str, str]:
    return f"sqla+sqlite:///{tmp / 'broker.db'}", f"db+sqlite:///{tmp / 'results.db'}"


def test_embedded_broker_runs_a_grid_without_any_server(tiny_model_dir: Path, tmp_path: Path) -> None:
    broker, backend = _embedded_urls(tmp_path)
    worker = WorkerProcess(_worker_env(tiny_model_dir, broker, backend), tmp_path / "worker.log").start()
    app = client_app(broker, backend)  # the stock sqla transport, as the bot publishes
    try:
        worker.wait_ready()
        job_id = _job_id("embedded")
        outcome = wait_outcome(_send(app, request(job_id)), timeout=120)
        assert outcome.result is not None, outcome.error
        assert outcome.result.layout is Layout.GRID
        assert (outcome.result.image.width, outcome.result.image.height) == (128, 128)
    finally:
        app.close()
        worker.stop()
    # Acknowledged messages are deleted, not kept forever as the stock transport does.
    import sqlite3

    with sqlite3.connect(tmp_path / "broker.db") as db:
        assert db.execute("SELECT COUNT(*) FROM kombu_message").fetchone() == (0,)


def test_a_job_survives_its_worker_being_sigkilled_embedded(tiny_model_dir: Path, tmp_path: Path) -> None:
    broker, backend = _embedded_urls(tmp_path)
    job_id, app, logs = _crash_and_recover(tiny_model_dir, tmp_path, broker, backend)
    try:
        assert _finished_lines(logs, job_id) == 1
        assert "redelivered (start 2)" in logs
    finally:
        app.close()


def test_api_worker_on_a_thread_pool_shares_one_engine(tmp_path: Path) -> None:
    # The api queue's worker: threads, one shared OpenAIEngine. Upscales need no API key (Lanczos);
    # generation without a key is a typed ENGINE_UNAVAILABLE, not a crash.
    url = fresh_redis_db(API_DB)
    env = {"BROKER_URL": url, "RESULT_BACKEND": url, "OPENAI_API_KEY": "", "WARMUP": "1"}
    worker = WorkerProcess(env, tmp_path / "api.log", queues=QUEUE_API, pool="threads", concurrency=4).start()
    app = client_app(url, url)
    try:
        worker.wait_ready()
        results = [
            app.send_task(
                TASK_OPENAI,
                args=[request(job_id, JobKind.UPSCALE, count=1, input_image=png_b64(64, 64))],
                task_id=job_id,
                queue=QUEUE_API,
            )
            for job_id in (_job_id("api-up") for _ in range(6))
        ]
        for result in results:
            outcome = wait_outcome(result, timeout=60)
            assert outcome.result is not None, outcome.error
            assert outcome.result.layout is Layout.SINGLE
            assert decoded(outcome.result.image.data_b64).size == (128, 128)
        job_id = _job_id("api-nokey")
        nokey = app.send_task(TASK_OPENAI, args=[request(job_id)], task_id=job_id, queue=QUEUE_API)
        outcome = wait_outcome(nokey, timeout=60)
        assert outcome.error is not None
        assert outcome.error.code is ErrorCode.ENGINE_UNAVAILABLE
        assert worker.log().count("loading the openai engine") == 1  # one engine, shared by threads
    finally:
        app.close()
        worker.stop()


def test_a_stale_copy_of_a_delivered_job_is_skipped_not_run_again(redis_worker: Running) -> None:
    # Redis hands a message out again after its visibility timeout, even when the bot's
    # supervisor already re-sent the job and delivered it. The bot's forget() leaves a small
    # SUCCESS marker in place of the images, so the worker skips the stale copy.
    import asyncio

    from celery.result import AsyncResult
    from kombu import Connection

    from bot.dispatch import FORGOTTEN, CeleryDispatcher

    app, url = redis_worker.app, redis_worker.broker
    job_id = _job_id("stale")
    assert wait_outcome(_send(app, request(job_id)), timeout=120).result is not None

    async def forget() -> None:
        dispatcher = CeleryDispatcher.from_urls(url, url)
        try:
            await dispatcher.forget(job_id)
        finally:
            await dispatcher.close()

    asyncio.run(forget())
    stored = AsyncResult(job_id, app=app)
    assert (stored.state, stored.result) == ("SUCCESS", FORGOTTEN)  # the images are gone

    # A long job keeps the worker busy (prefetch 1: it takes nothing else meanwhile) while a copy
    # of the delivered job's message is taken from the queue and dropped unacknowledged: kombu's
    # Redis transport puts it back marked redelivered, as after a visibility timeout.
    busy = _send(app, request(_job_id("busy"), steps=LONG_STEPS))
    assert wait_for(lambda: busy.state in ("STARTED", "PROGRESS"), 60)
    _send(app, request(job_id))
    with Connection(url) as conn:
        queue = conn.SimpleQueue(QUEUE_GPU, no_ack=False)
        message = queue.get(timeout=30)
        assert message.headers["id"] == job_id
        queue.close()  # unacknowledged: restored to the queue as redelivered
    wait_outcome(busy, timeout=120)
    log = redis_worker.worker.log
    assert wait_for(lambda: f"[{job_id}] Task already completed successfully" in log(), 120), log()[-3000:]
    assert _finished_lines(log(), job_id) == 1  # the engine ran once, for the real delivery
    assert AsyncResult(job_id, app=app).result == FORGOTTEN


def test_a_job_taken_while_the_result_store_restarts_waits_for_it_instead_of_failing(
    rabbitmq_url: str, tmp_path: Path
) -> None:
    """Production queues jobs in RabbitMQ and keeps results in Redis: a worker can take a queued job
    while Redis restarts. The job must wait for the store and then run, not fail (a refund) or be
    acknowledged with no outcome stored anywhere (lost)."""
    if not PrivateRedis.available():
        pytest.skip("redis-server is not installed")
    from celery.result import AsyncResult

    store = PrivateRedis(tmp_path / "redis").start()
    queue = _job_id("api-outage")
    env = {"BROKER_URL": rabbitmq_url, "RESULT_BACKEND": store.url, "OPENAI_API_KEY": "", "WARMUP": "0"}
    worker = WorkerProcess(env, tmp_path / "worker.log", queues=queue, pool="threads", concurrency=1).start()
    # The job was queued before the store went down: sent by a client that needs no result store.
    sender = Celery("mirage-test-sender", broker=rabbitmq_url, set_as_current=False)
    sender.conf.update(task_serializer="json", task_queue_max_priority=10)  # as the workers declare it
    job_id = _job_id("outage")
    try:
        worker.wait_ready()
        store.stop()
        payload = request(job_id, JobKind.UPSCALE, count=1, input_image=png_b64(64, 64))
        sender.send_task(TASK_OPENAI, args=[payload], task_id=job_id, queue=queue, routing_key=queue)
        # Celery's own retries of one store operation give up within seconds; the worker keeps waiting.
        waiting = f"job {job_id}: the result store is unreachable"
        failed = "Exception raised outside body"  # Celery gave up on the store and failed the task
        assert wait_for(lambda: worker.log().count(waiting) >= 2 or failed in worker.log(), 120, 0.2)
        assert failed not in worker.log(), worker.log()[-3000:]
        store.start()
        client = client_app(rabbitmq_url, store.url)
        try:
            outcome = wait_outcome(AsyncResult(job_id, app=client), timeout=120)
        finally:
            client.close()
        assert outcome.result is not None, outcome.error
        assert outcome.result.layout is Layout.SINGLE
    finally:
        worker.stop()
        store.stop()
        with sender.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)
        sender.close()


# Loaded by the worker's interpreter at start (PYTHONPATH): its SDXL engine is a stand-in whose
# first run fails as a GPU that lost its context does; the runs after it succeed.
BROKEN_DEVICE_SITE = """
import os
from pathlib import Path

import workers.runtime as runtime

FLAG = Path(os.environ["MIRAGE_TEST_BROKEN_FLAG"])


class OnceBrokenEngine:
    device = "cpu"

    def run(self, request, progress, cancelled):
        import torch
        from PIL import Image

        from workers.output import EngineOutput
        from workers.schema import Engine, EngineReport

        if not FLAG.exists():
            FLAG.write_text(str(os.getpid()))
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
        images = [Image.new("RGB", (16, 16), (20 * i, 90, 200)) for i in range(request.count)]
        return EngineOutput(images, request.seed, EngineReport(engine=Engine.SDXL, model="stand-in"))


runtime.DEFAULT_LOADERS[runtime.SDXL] = lambda settings: OnceBrokenEngine()
"""


def test_a_gpu_error_that_breaks_the_process_reruns_the_job_in_a_fresh_one(tmp_path: Path) -> None:
    """A CUDA error that leaves the pool process's device unusable: the process is replaced and the
    job runs again in the new one and is delivered, instead of this job and every later one
    failing with an engine error (each refunded) in a process that can no longer use its GPU."""
    pytest.importorskip("torch")
    if not PrivateRedis.available():
        pytest.skip("redis-server is not installed")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BROKEN_DEVICE_SITE)
    flag = tmp_path / "broken-once"
    store = PrivateRedis(tmp_path / "redis").start()
    env = {
        "BROKER_URL": store.url,
        "RESULT_BACKEND": store.url,
        "WARMUP": "0",
        "MIRAGE_TEST_BROKEN_FLAG": str(flag),
        "PYTHONPATH": f"{site}{os.pathsep}{REPO}",
    }
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    app = client_app(store.url, store.url)
    try:
        worker.wait_ready()
        job_id = _job_id("broken-device")
        outcome = wait_outcome(_send(app, request(job_id)), timeout=120)
        assert outcome.result is not None, (outcome.error, worker.log()[-3000:])
        log = worker.log()
        assert "WorkerLostError" in log  # the broken process went, and its job with it back to the queue
        assert "redelivered (start 2)" in log
        broken_pid = int(flag.read_text())

        def gone() -> bool:
            try:
                os.kill(broken_pid, 0)
            except ProcessLookupError:
                return True
            return False

        assert wait_for(gone, timeout=30) and not worker.exited()  # the worker itself lives on
    finally:
        app.close()
        worker.stop()
        store.stop()
