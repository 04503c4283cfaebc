"""Fast checks of the worker's Celery configuration and task wrapper; no worker process runs here."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded
from kombu import Connection, Queue

import workers.celery_app as celery_app
import workers.tasks as tasks
from workers.__main__ import worker_argv
from workers.celery_app import (
    DeliveryCounter,
    NullDeliveryCounter,
    RedisDeliveryCounter,
    SQLDeliveryCounter,
    broker_transport_options,
    make_celery,
    make_delivery_counter,
    worker_broker_url,
)
from workers.progress import PROGRESS_STATE, CancelCheck, ProgressSink
from workers.schema import (
    QUEUE_API,
    QUEUE_GPU,
    TASK_OPENAI,
    TASK_SDXL,
    ErrorCode,
    GenerationParams,
    ImageOut,
    JobKind,
    JobRequest,
    JobResult,
    Progress,
    TaskOutcome,
    WorkerError,
)
from workers.schema import Engine as EngineName
from workers.settings import WorkerSettings

REPO = Path(__file__).resolve().parents[1]


def _settings(**overrides: Any) -> WorkerSettings:
    values: dict[str, Any] = {
        "broker_url": "redis://127.0.0.1:6379/0",
        "result_backend": "redis://127.0.0.1:6379/1",
        "warmup": False,
    }
    values.update(overrides)
    return WorkerSettings(**values)


@pytest.fixture
def redis_app() -> Iterator[Celery]:
    app = make_celery(_settings())
    yield app
    app.close()


# --------------------------------------------------------------------------- configuration


def test_tasks_are_routed_to_their_queues(redis_app: Celery) -> None:
    routes = redis_app.conf.task_routes
    assert routes[TASK_SDXL] == {"queue": QUEUE_GPU}
    assert routes[TASK_OPENAI] == {"queue": QUEUE_API}
    assert redis_app.amqp.router.route({}, TASK_SDXL)["queue"].name == QUEUE_GPU
    assert redis_app.amqp.router.route({}, TASK_OPENAI)["queue"].name == QUEUE_API


def test_both_tasks_are_registered_by_name(redis_app: Celery) -> None:
    redis_app.loader.import_default_modules()
    assert {TASK_SDXL, TASK_OPENAI} <= set(redis_app.tasks)


def test_reliability_settings(redis_app: Celery) -> None:
    conf = redis_app.conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.worker_deduplicate_successful_tasks is True
    assert conf.task_track_started is True
    assert conf.result_extended is True


def test_time_limits_and_visibility_timeout(redis_app: Celery) -> None:
    conf = redis_app.conf
    settings = _settings()
    assert conf.task_soft_time_limit == settings.task_soft_time_limit_s
    assert conf.task_time_limit == settings.task_time_limit_s
    assert conf.task_soft_time_limit < conf.task_time_limit
    visibility = conf.broker_transport_options["visibility_timeout"]
    assert visibility == settings.visibility_timeout_s
    assert visibility > conf.task_time_limit
    # kombu's default sweep for abandoned messages is ~100 s; ours follows the timeout.
    assert conf.broker_transport_options["unacked_restore_throttle"] == 1


def test_json_only(redis_app: Celery) -> None:
    conf = redis_app.conf
    assert conf.task_serializer == "json"
    assert conf.result_serializer == "json"
    assert list(conf.accept_content) == ["json"]
    assert list(conf.result_accept_content) == ["json"]


def test_redelivery_bound_comes_from_settings() -> None:
    app = make_celery(_settings(max_redeliveries=5))
    assert celery_app.settings_of(app).max_redeliveries == 5


@pytest.mark.parametrize(
    ("soft", "hard", "visibility"),
    [(100, 100, 500), (200, 100, 500), (10, 100, 100), (10, 100, 50)],
)
def test_inconsistent_limits_are_refused(soft: int, hard: int, visibility: int) -> None:
    with pytest.raises(ValueError):
        make_celery(
            _settings(task_soft_time_limit_s=soft, task_time_limit_s=hard, visibility_timeout_s=visibility)
        )


def test_sqla_options_are_safe_for_the_stock_transport(tmp_path: Path) -> None:
    # The bot publishes with kombu's stock sqla transport, which hands every transport option to
    # create_engine: a Redis option such as visibility_timeout there would break it.
    url = f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    options = broker_transport_options(url, 1800)
    assert "visibility_timeout" not in options
    with Connection(url, transport_options=options) as conn:
        conn.Producer().publish({"x": 1}, routing_key="gpu", declare=[Queue("gpu")])


def test_worker_uses_the_durable_transport_only_for_sqla() -> None:
    assert worker_broker_url("sqla+sqlite:///./data/broker.db") == "mirage-sqla+sqlite:///./data/broker.db"
    assert worker_broker_url("redis://localhost:6379/0") == "redis://localhost:6379/0"
    app = make_celery(_settings(broker_url="sqla+sqlite:///./data/broker.db"))
    assert app.connection_for_write().transport_cls == "mirage-sqla"


def test_embedded_defaults_make_their_folder_and_use_wal(tmp_path: Path) -> None:
    broker = tmp_path / "nested" / "broker.db"
    results = tmp_path / "nested" / "results.db"
    settings = _settings(broker_url=f"sqla+sqlite:///{broker}", result_backend=f"db+sqlite:///{results}")
    make_celery(settings)
    assert not broker.parent.exists()  # importing or configuring the app creates nothing
    celery_app.prepare_local_storage(settings)  # what a starting worker does
    with sqlite3.connect(results) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_importing_the_worker_modules_does_not_import_torch() -> None:
    code = (
        "import sys, workers.schema, workers.celery_app, workers.tasks, workers.progress, workers.__main__;"
        "assert 'torch' not in sys.modules, 'torch imported';"
        "assert 'diffusers' not in sys.modules, 'diffusers imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


@pytest.mark.parametrize(
    ("queues", "pool", "concurrency"),
    [(["gpu"], "prefork", 1), (["api"], "threads", 8), (["gpu", "api"], "prefork", 1)],
)
def test_worker_command_defaults(queues: list[str], pool: str, concurrency: int) -> None:
    argv = worker_argv(queues)
    assert argv[0] == "worker"
    assert f"--pool={pool}" in argv
    assert f"--concurrency={concurrency}" in argv
    assert f"--queues={','.join(queues)}" in argv


# --------------------------------------------------------------------------- the task wrapper


class FakeBackend:
    """Records what a task stores as its state."""

    def __init__(self) -> None:
        self.stored: list[tuple[str, str, dict[str, Any]]] = []

    def store_result(self, task_id: str, meta: dict[str, Any], state: str, **_: Any) -> None:
        self.stored.append((task_id, state, meta))


class FakeTask:
    """Just what ``run_job`` uses of a bound Celery task."""

    def __init__(self, app: Celery, task_id: str) -> None:
        self.app = app
        self.request = SimpleNamespace(id=task_id)
        self.backend = FakeBackend()


class FakeEngine:
    """Reports two steps and returns one image, or raises what it was given."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error
        self.runs = 0

    def run(self, request: JobRequest, progress: Any, cancelled: Any) -> JobResult:
        self.runs += 1
        progress(Progress(job_id=request.job_id, percent=50, step=1, total_steps=2))
        progress(Progress(job_id=request.job_id, percent=100, step=2, total_steps=2))
        if self.error is not None:
            raise self.error
        image = ImageOut(data="", width=64, height=64)
        return JobResult(job_id=request.job_id, images=[image], seed=request.seed, engine=EngineName.SDXL)


class FakeCounter(DeliveryCounter):
    def __init__(self, start: int = 0) -> None:
        self.counts: dict[str, int] = {}
        self.start = start

    def incr(self, job_id: str) -> int:
        self.counts[job_id] = self.counts.get(job_id, self.start) + 1
        return self.counts[job_id]


@pytest.fixture
def memory_app() -> Iterator[Celery]:
    app = make_celery(_settings(broker_url="memory://", result_backend="cache+memory://", max_redeliveries=2))
    yield app
    app.close()


@pytest.fixture
def engine(monkeypatch: pytest.MonkeyPatch) -> FakeEngine:
    fake = FakeEngine()
    monkeypatch.setattr(tasks, "_engines", {})
    monkeypatch.setitem(tasks.LOADERS, tasks.SDXL, lambda settings: fake)
    return fake


@pytest.fixture
def counter(monkeypatch: pytest.MonkeyPatch) -> FakeCounter:
    fake = FakeCounter()
    monkeypatch.setattr(tasks, "delivery_counter", lambda settings: fake)
    return fake


def _job(job_id: str) -> dict[str, Any]:
    return JobRequest(
        job_id=job_id, kind=JobKind.IMAGINE, params=GenerationParams(prompt="a fox", steps=2), seed=3
    ).model_dump(mode="json")


def _run(app: Celery, job_id: str, payload: Any = None) -> tuple[TaskOutcome, FakeTask]:
    task = FakeTask(app, job_id)
    raw = tasks.run_job(task, tasks.SDXL, _job(job_id) if payload is None else payload)  # type: ignore[arg-type]
    return TaskOutcome.model_validate(raw), task


def test_a_job_returns_its_result_and_reports_progress(
    memory_app: Celery, engine: FakeEngine, counter: FakeCounter
) -> None:
    outcome, task = _run(memory_app, "job-ok")
    assert outcome.error is None
    assert outcome.result is not None and outcome.result.job_id == "job-ok"
    assert [state for _, state, _ in task.backend.stored] == [PROGRESS_STATE, PROGRESS_STATE]
    assert Progress.model_validate(task.backend.stored[-1][2]).percent == 100
    assert counter.counts == {"job-ok": 1}


def test_invalid_message_is_bad_input_without_running(
    memory_app: Celery, engine: FakeEngine, counter: FakeCounter
) -> None:
    outcome, _ = _run(memory_app, "job-bad", {"job_id": "job-bad", "kind": "imagine", "seed": -1})
    assert outcome.error is not None
    assert outcome.error.code is ErrorCode.BAD_INPUT
    assert outcome.error.job_id == "job-bad"
    assert engine.runs == 0


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (WorkerError(ErrorCode.CONTENT_POLICY, "Rejected by the content policy."), ErrorCode.CONTENT_POLICY),
        (WorkerError(ErrorCode.BAD_INPUT, "Bad image."), ErrorCode.BAD_INPUT),
        (SoftTimeLimitExceeded(), ErrorCode.TIMEOUT),
        (RuntimeError("CUDA error: key=sk-secret-value"), ErrorCode.ENGINE_ERROR),
    ],
)
def test_failures_become_typed_outcomes(
    memory_app: Celery,
    monkeypatch: pytest.MonkeyPatch,
    counter: FakeCounter,
    error: BaseException,
    code: ErrorCode,
) -> None:
    monkeypatch.setattr(tasks, "_engines", {})
    monkeypatch.setitem(tasks.LOADERS, tasks.SDXL, lambda settings: FakeEngine(error))
    outcome, _ = _run(memory_app, f"job-{code}")
    assert outcome.result is None
    assert outcome.error is not None
    assert outcome.error.code is code
    assert "sk-secret" not in outcome.error.message
    if isinstance(error, WorkerError):
        assert outcome.error.message == error.message


def test_an_engine_that_cannot_load_is_unavailable_and_retried_next_job(
    memory_app: Celery, monkeypatch: pytest.MonkeyPatch, counter: FakeCounter
) -> None:
    attempts = []

    def broken(settings: WorkerSettings) -> Any:
        attempts.append(1)
        raise OSError("no such model folder")

    monkeypatch.setattr(tasks, "_engines", {})
    monkeypatch.setitem(tasks.LOADERS, tasks.SDXL, broken)
    for job_id in ("job-u1", "job-u2"):
        outcome, _ = _run(memory_app, job_id)
        assert outcome.error is not None and outcome.error.code is ErrorCode.ENGINE_UNAVAILABLE
    assert len(attempts) == 2


def test_redelivery_past_the_bound_is_refused_without_running(
    memory_app: Celery, engine: FakeEngine, counter: FakeCounter
) -> None:
    # max_redeliveries=2: starts 1, 2 and 3 run; the 4th returns an error instead.
    for _ in range(3):
        outcome, _ = _run(memory_app, "job-poison")
        assert outcome.result is not None
    outcome, _ = _run(memory_app, "job-poison")
    assert outcome.error is not None and outcome.error.code is ErrorCode.ENGINE_ERROR
    assert engine.runs == 3


def test_a_counter_failure_does_not_lose_the_job(
    memory_app: Celery, engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Down(DeliveryCounter):
        def incr(self, job_id: str) -> int:
            raise ConnectionError("redis is down")

    monkeypatch.setattr(tasks, "delivery_counter", lambda settings: Down())
    outcome, _ = _run(memory_app, "job-counter-down")
    assert outcome.result is not None


def test_a_revoked_job_is_cancelled_before_it_starts(
    memory_app: Celery, engine: FakeEngine, counter: FakeCounter
) -> None:
    from celery.worker import state

    state.revoked.add("job-revoked")
    try:
        outcome, _ = _run(memory_app, "job-revoked")
    finally:
        state.revoked.discard("job-revoked")
    assert outcome.error is not None and outcome.error.code is ErrorCode.CANCELLED
    assert engine.runs == 0


def test_the_engine_is_loaded_once_per_process_and_shared_by_threads(
    memory_app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[int] = []

    def slow_loader(settings: WorkerSettings) -> FakeEngine:
        loads.append(1)
        time.sleep(0.2)
        return FakeEngine()

    monkeypatch.setattr(tasks, "_engines", {})
    monkeypatch.setitem(tasks.LOADERS, tasks.OPENAI, slow_loader)
    settings = celery_app.settings_of(memory_app)
    got: list[Any] = []
    threads = [
        threading.Thread(target=lambda: got.append(tasks.get_engine(tasks.OPENAI, settings)))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(loads) == 1
    assert len({id(engine) for engine in got}) == 1
    # An engine inherited across a fork (another pid) is never reused: CUDA does not survive fork.
    monkeypatch.setitem(tasks._engines, tasks.OPENAI, (os.getpid() + 1, got[0]))
    assert tasks.get_engine(tasks.OPENAI, settings) is not got[0]
    assert len(loads) == 2


# --------------------------------------------------------------------------- progress and cancel


def test_progress_sink_throttles_but_always_reports_the_end() -> None:
    task = FakeTask(Celery(set_as_current=False), "job-p")
    sink = ProgressSink(task, "job-p", min_interval_s=60)
    for percent in (10, 20, 30, 100):
        sink(Progress(job_id="job-p", percent=percent))
    assert [meta["percent"] for _, _, meta in task.backend.stored] == [10, 100]


def test_progress_sink_survives_a_backend_error() -> None:
    class Broken:
        def store_result(self, *args: Any, **kwargs: Any) -> None:
            raise ConnectionError("backend down")

    task = SimpleNamespace(backend=Broken())
    ProgressSink(task, "job-x")(Progress(job_id="job-x", percent=5))  # no exception


def test_cancel_check_sees_the_relayed_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(celery_app.ENV_CANCEL_DIR, str(tmp_path))
    check = CancelCheck("job-c")
    assert check() is False
    (tmp_path / "job-c").touch()  # what CancelRelay writes in the main process
    assert check() is True
    check.cleanup()
    assert not (tmp_path / "job-c").exists()
    assert check() is True  # once cancelled, stays cancelled


def test_cancel_flag_refuses_path_tricks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(celery_app.ENV_CANCEL_DIR, str(tmp_path))
    assert celery_app.cancel_flag("../etc") is None
    assert celery_app.cancel_flag("..") is None
    assert celery_app.cancel_flag("abc") == tmp_path / "abc"


# --------------------------------------------------------------------------- delivery counters


def test_sql_delivery_counter_counts_per_job(tmp_path: Path) -> None:
    counter = SQLDeliveryCounter(f"sqlite:///{tmp_path / 'results.db'}")
    assert [counter.incr("a"), counter.incr("a"), counter.incr("b"), counter.incr("a")] == [1, 2, 1, 3]
    again = SQLDeliveryCounter(f"sqlite:///{tmp_path / 'results.db'}")  # another process, same file
    assert again.incr("a") == 4


def test_sql_delivery_counter_on_postgres(pg_url: str) -> None:
    counter = SQLDeliveryCounter(pg_url)
    assert [counter.incr("a"), counter.incr("a"), counter.incr("b")] == [1, 2, 1]


def test_redis_delivery_counter(redis_url: str) -> None:
    counter = RedisDeliveryCounter(redis_url, ttl_s=60)
    job = f"test-{uuid.uuid4().hex}"
    assert [counter.incr(job), counter.incr(job)] == [1, 2]
    import redis

    assert 0 < redis.Redis.from_url(redis_url).ttl(f"mirage:deliveries:{job}") <= 60


def test_counter_choice_follows_the_configuration(tmp_path: Path) -> None:
    assert isinstance(make_delivery_counter(_settings()), RedisDeliveryCounter)
    sql = _settings(broker_url="sqla+sqlite:///x.db", result_backend=f"db+sqlite:///{tmp_path / 'r.db'}")
    assert isinstance(make_delivery_counter(sql), SQLDeliveryCounter)
    none = _settings(broker_url="memory://", result_backend="cache+memory://")
    assert isinstance(make_delivery_counter(none), NullDeliveryCounter)


# --------------------------------------------------------------------------- embedded broker


@pytest.fixture
def sqla_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    monkeypatch.setattr(celery_app, "_sqla_visibility_timeout_s", 1.0)
    url = f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    return url, worker_broker_url(url)


def _publish(url: str, *bodies: dict[str, Any]) -> None:
    with Connection(url) as conn:  # the stock transport, as the bot publishes
        producer = conn.Producer()
        for body in bodies:
            producer.publish(body, routing_key="gpu", declare=[Queue("gpu")])


def _rows(url: str) -> list[tuple[int, int]]:
    path = url.split(":///", 1)[1]
    with sqlite3.connect(path) as db:
        return db.execute("SELECT id, visible FROM kombu_message ORDER BY id").fetchall()


def test_durable_sqla_deletes_acknowledged_messages(sqla_urls: tuple[str, str]) -> None:
    stock, durable = sqla_urls
    _publish(stock, {"n": 1}, {"n": 2})
    with Connection(durable) as conn, conn.SimpleQueue("gpu") as queue:
        for _ in range(2):
            queue.get(timeout=2).ack()
    assert _rows(stock) == []


def test_durable_sqla_requeue_makes_the_same_row_visible(sqla_urls: tuple[str, str]) -> None:
    stock, durable = sqla_urls
    _publish(stock, {"n": 1})
    with Connection(durable) as conn, conn.SimpleQueue("gpu") as queue:
        queue.get(timeout=2).requeue()
        again = queue.get(timeout=2)
        assert again.payload == {"n": 1}
        assert again.delivery_info.get("redelivered") is True
        again.ack()
    assert _rows(stock) == []


def test_durable_sqla_restores_a_message_whose_consumer_died(sqla_urls: tuple[str, str]) -> None:
    stock, durable = sqla_urls
    _publish(stock, {"n": 1})
    with Connection(durable) as conn, conn.SimpleQueue("gpu") as queue:
        assert queue.get(timeout=2).payload == {"n": 1}
        queue.channel.qos._delivered.clear()  # the consumer "dies": no ack, nothing restored
    assert _rows(stock) == [(1, 0)]
    time.sleep(1.2)  # past the visibility timeout
    with Connection(durable) as conn, conn.SimpleQueue("gpu") as queue:
        message = queue.get(timeout=3)
        assert message.payload == {"n": 1}
        assert message.delivery_info.get("redelivered") is True
        message.ack()
    assert _rows(stock) == []


# --------------------------------------------------------------------------- the check command


def _check(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {
        k: v for k, v in os.environ.items() if not k.startswith(("BROKER", "RESULT", "OPENAI", "CELERY"))
    }
    environ.update(PYTHONPATH=str(REPO), **env)
    return subprocess.run(
        [sys.executable, "-m", "workers", "check"],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_check_passes_on_the_embedded_defaults(tmp_path: Path) -> None:
    done = _check(tmp_path)
    assert done.returncode == 0, done.stderr
    assert "OK" in done.stdout
    assert (tmp_path / "data" / "broker.db").exists()


def test_check_fails_on_an_unreachable_broker_and_masks_secrets(tmp_path: Path) -> None:
    done = _check(
        tmp_path,
        BROKER_URL="redis://:hunter2@127.0.0.1:1/0",
        RESULT_BACKEND="redis://:hunter2@127.0.0.1:1/1",
        OPENAI_API_KEY="sk-test-very-secret",
        OPENAI_BASE_URL="http://127.0.0.1:1/v1",
    )
    assert done.returncode == 1
    output = done.stdout + done.stderr
    assert "broker unreachable" in output
    assert "hunter2" not in output
    assert "sk-test-very-secret" not in output


def test_flag_folders_of_killed_workers_are_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(celery_app.tempfile, "gettempdir", lambda: str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"mirage-cancel-{dead.pid}-1").mkdir()
    (tmp_path / f"mirage-cancel-{os.getpid()}-1").mkdir()
    celery_app._remove_stale_cancel_dirs()
    assert not (tmp_path / f"mirage-cancel-{dead.pid}-1").exists()
    assert (tmp_path / f"mirage-cancel-{os.getpid()}-1").exists()
