"""The task layer (``workers.tasks.run_job``) with fake engines: outcomes, bounds, one encode.

No worker process runs here: a fake bound task carries a real app (and so a real
``WorkerRuntime``) and a result backend that records what progress was stored.
"""

from __future__ import annotations

import base64
import io
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery, states
from celery.exceptions import Reject, SoftTimeLimitExceeded
from celery.result import AsyncResult
from PIL import Image

import workers.tasks as tasks
from workers.celery_app import make_celery
from workers.output import EngineOutput
from workers.progress import PROGRESS_STATE
from workers.redelivery import DeliveryCounter
from workers.runtime import OPENAI, SDXL, WorkerRuntime, runtime_of
from workers.schema import (
    SCHEMA_VERSION,
    TASK_SDXL,
    Engine,
    EngineReport,
    ErrorCode,
    GenerationParams,
    ImageFormat,
    JobFailed,
    JobKind,
    JobRequest,
    Layout,
    Progress,
    SafetyVerdict,
    TaskOutcome,
    WorkerError,
)
from workers.settings import WorkerSettings

TILE = 96


class FakeBackend:
    """Records what a task stores as its state; every job reads as not started yet."""

    def __init__(self) -> None:
        self.stored: list[tuple[str, str, dict[str, Any]]] = []

    def store_result(self, task_id: str, meta: dict[str, Any], state: str, **_: Any) -> None:
        self.stored.append((task_id, state, meta))

    def get_task_meta(self, task_id: str, cache: bool = True) -> dict[str, Any]:
        return {"task_id": task_id, "status": states.PENDING, "result": None}


class FakeTask:
    """Just what ``run_job`` uses of a bound Celery task."""

    def __init__(self, app: Celery, task_id: str) -> None:
        self.app = app
        self.request = SimpleNamespace(id=task_id)
        self.backend = FakeBackend()


def tile(index: int, size: int = TILE) -> Image.Image:
    """A distinct, non-trivial RGB image per index, so a grid's quadrants can be told apart."""
    image = Image.new("RGB", (size, size), (40 * index, 255 - 40 * index, 90))
    for x in range(size):
        image.putpixel((x, (x * (index + 1)) % size), (x % 256, index * 50, 255 - x % 256))
    return image


class FakeEngine:
    """Reports two steps and returns ``count`` images, or raises what it was given."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error
        self.runs = 0
        self.outputs: list[EngineOutput] = []

    def run(self, request: JobRequest, progress: Any, cancelled: Any) -> EngineOutput:
        self.runs += 1
        progress(Progress(job_id=request.job_id, percent=50, step=1, total_steps=2))
        progress(Progress(job_id=request.job_id, percent=100, step=2, total_steps=2))
        if self.error is not None:
            raise self.error
        output = EngineOutput(
            images=[tile(index) for index in range(request.count)],
            seed=request.seed,
            report=EngineReport(engine=Engine.SDXL, model="fake", steps=2),
            phases={"denoise": 0.25, "vae_decode": 0.05},
            notes=["a note"],
        )
        self.outputs.append(output)
        return output


class FakeCounter(DeliveryCounter):
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def incr(self, job_id: str) -> int:
        self.counts[job_id] = self.counts.get(job_id, 0) + 1
        return self.counts[job_id]


def _settings(**overrides: Any) -> WorkerSettings:
    values: dict[str, Any] = {
        "broker_url": "memory://",
        "result_backend": "cache+memory://",
        "max_redeliveries": 2,
        "warmup": False,
    }
    values.update(overrides)
    return WorkerSettings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
def app() -> Iterator[Celery]:
    app = make_celery(_settings())
    yield app
    app.close()


@pytest.fixture
def runtime(app: Celery) -> WorkerRuntime:
    return runtime_of(app)


@pytest.fixture
def fake_engine(runtime: WorkerRuntime) -> FakeEngine:
    fake = FakeEngine()
    runtime.loaders[SDXL] = lambda settings: fake
    return fake


@pytest.fixture
def counter(runtime: WorkerRuntime, monkeypatch: pytest.MonkeyPatch) -> FakeCounter:
    fake = FakeCounter()
    monkeypatch.setattr(runtime, "delivery_counter", lambda: fake)
    return fake


def _job(job_id: str, **fields: Any) -> dict[str, Any]:
    params = GenerationParams(prompt="a fox", steps=2)
    request = JobRequest(job_id=job_id, kind=JobKind.IMAGINE, params=params, seed=3, **fields)
    return request.model_dump(mode="json")


def _run(app: Celery, job_id: str, payload: Any = None) -> tuple[TaskOutcome, FakeTask]:
    task = FakeTask(app, job_id)
    raw = tasks.run_job(task, SDXL, _job(job_id) if payload is None else payload)  # type: ignore[arg-type]
    return TaskOutcome.model_validate(raw), task


def _decode(data_b64: str) -> Image.Image:
    with Image.open(io.BytesIO(base64.b64decode(data_b64))) as image:
        image.load()
        return image.convert("RGB")


# --------------------------------------------------------------------------- results


def test_a_grid_job_returns_one_composed_image_and_reports_progress(
    app: Celery, fake_engine: FakeEngine, counter: FakeCounter
) -> None:
    outcome, task = _run(app, "job-ok")
    assert outcome.error is None
    result = outcome.result
    assert result is not None and result.job_id == "job-ok"
    assert result.layout is Layout.GRID
    assert (result.image.width, result.image.height) == (2 * TILE, 2 * TILE)
    assert (result.tile_width, result.tile_height) == (TILE, TILE)
    assert result.seed == 3
    assert result.notes == ["a note"]
    assert result.report.model == "fake"
    assert result.timings.generation_s == pytest.approx(0.3)
    assert result.timings.total_s >= result.timings.encode_s
    assert [state for _, state, _ in task.backend.stored] == [states.STARTED, PROGRESS_STATE, PROGRESS_STATE]
    assert Progress.model_validate(task.backend.stored[-1][2]).percent == 100
    assert counter.counts == {"job-ok": 1}


def test_a_grid_is_encoded_exactly_once_and_nothing_is_decoded_on_the_worker(
    app: Celery, fake_engine: FakeEngine, counter: FakeCounter, monkeypatch: pytest.MonkeyPatch
) -> None:
    saves: list[str] = []
    opens: list[object] = []
    real_save, real_open = Image.Image.save, Image.open

    def counting_save(self: Image.Image, fp: Any, format: str | None = None, **params: Any) -> None:
        saves.append(str(format))
        real_save(self, fp, format, **params)

    def counting_open(*args: Any, **kwargs: Any) -> Image.Image:
        opens.append(args[0] if args else kwargs)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", counting_save)
    monkeypatch.setattr(Image, "open", counting_open)
    outcome, _ = _run(app, "job-count")
    monkeypatch.undo()  # stop counting before the test decodes the result itself

    assert outcome.result is not None, outcome.error
    assert len(saves) == 1  # the composed grid, once
    assert opens == []  # the worker never decodes its own output
    pixels = _decode(outcome.result.image.data_b64)
    assert pixels.size == (2 * TILE, 2 * TILE)


def test_an_upscale_is_a_single_image(app: Celery, fake_engine: FakeEngine, counter: FakeCounter) -> None:
    outcome, _ = _run(app, "job-up", _job("job-up", count=1))
    assert outcome.result is not None
    assert outcome.result.layout is Layout.SINGLE
    assert (outcome.result.image.width, outcome.result.image.height) == (TILE, TILE)
    assert list(_decode(outcome.result.image.data_b64).getdata()) == list(tile(0).getdata())


@pytest.mark.parametrize("image_format", [ImageFormat.PNG, ImageFormat.WEBP])
def test_the_configured_format_is_used_and_lossless(
    image_format: ImageFormat, fake_engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_celery(_settings(image_format=image_format))
    runtime = runtime_of(app)
    runtime.loaders[SDXL] = lambda settings: fake_engine
    monkeypatch.setattr(runtime, "delivery_counter", FakeCounter)
    outcome, _ = _run(app, "job-format")
    assert outcome.result is not None, outcome.error
    assert outcome.result.image.format is image_format
    raw = base64.b64decode(outcome.result.image.data_b64)
    assert Image.open(io.BytesIO(raw)).format == image_format.name
    grid = _decode(outcome.result.image.data_b64)
    for index, image in enumerate(fake_engine.outputs[0].images):
        x, y = (index % 2) * TILE, (index // 2) * TILE
        assert list(grid.crop((x, y, x + TILE, y + TILE)).getdata()) == list(image.getdata())


def test_an_engine_breaking_the_output_contract_is_an_engine_error(
    app: Celery, runtime: WorkerRuntime, counter: FakeCounter
) -> None:
    class Mixed:
        def run(self, request: JobRequest, progress: Any, cancelled: Any) -> EngineOutput:
            images = [tile(0), tile(1), tile(2), tile(3, size=TILE + 1)]
            return EngineOutput(images, 3, EngineReport(engine=Engine.SDXL, model="fake"))

    runtime.loaders[SDXL] = lambda settings: Mixed()
    outcome, _ = _run(app, "job-mixed")
    assert outcome.error is not None and outcome.error.code is ErrorCode.ENGINE_ERROR


# --------------------------------------------------------------------------- refusals and failures


@pytest.mark.parametrize("version", [1, SCHEMA_VERSION + 1])
def test_another_schema_version_is_refused_without_running(
    app: Celery, fake_engine: FakeEngine, counter: FakeCounter, version: int
) -> None:
    payload = {**_job("job-version"), "version": version}
    outcome, _ = _run(app, "job-version", payload)
    assert outcome.error is not None
    assert outcome.error.code is ErrorCode.ENGINE_UNAVAILABLE
    assert "different Mirage versions" in outcome.error.message
    assert f"version {version}" in outcome.error.message
    assert fake_engine.runs == 0
    assert counter.counts == {}


def test_invalid_message_is_bad_input_without_running(
    app: Celery, fake_engine: FakeEngine, counter: FakeCounter
) -> None:
    outcome, _ = _run(app, "job-bad", {"job_id": "job-bad", "kind": "imagine", "seed": -1})
    assert outcome.error is not None
    assert outcome.error.code is ErrorCode.BAD_INPUT
    assert outcome.error.job_id == "job-bad"
    assert fake_engine.runs == 0


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
    app: Celery, runtime: WorkerRuntime, counter: FakeCounter, error: BaseException, code: ErrorCode
) -> None:
    runtime.loaders[SDXL] = lambda settings: FakeEngine(error)
    outcome, _ = _run(app, f"job-{code}")
    assert outcome.result is None
    assert outcome.error is not None
    assert outcome.error.code is code
    assert "sk-secret" not in outcome.error.message
    if isinstance(error, WorkerError):
        assert outcome.error.message == error.message


def _device_error(broken: bool) -> BaseException:
    torch = pytest.importorskip("torch")
    if broken:  # what torch 2.8+ raises for a failed CUDA call; the context is unusable after it
        return torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_a_broken_device_retires_the_pool_process_and_hands_the_job_back(
    app: Celery, runtime: WorkerRuntime, counter: FakeCounter
) -> None:
    # Every later CUDA call of this process fails: kept, it would fail (and refund) every job it
    # takes. SystemExit ends the prefork child after its result slot is reported; Celery reads that
    # as a lost worker and requeues the message (task_reject_on_worker_lost), billiard starts a
    # fresh child, and the job runs again there: minutes, not a refund (bounded by MAX_REDELIVERIES).
    engine = FakeEngine(_device_error(broken=True))
    runtime.loaders[SDXL] = lambda settings: engine
    runtime.pool_child = True  # set by worker_process_init in a prefork child
    with pytest.raises(SystemExit):
        _run(app, "job-xid")
    assert engine.runs == 1


def test_an_out_of_memory_error_fails_only_its_job(
    app: Celery, runtime: WorkerRuntime, counter: FakeCounter
) -> None:
    engine = FakeEngine(_device_error(broken=False))
    runtime.loaders[SDXL] = lambda settings: engine
    runtime.pool_child = True
    outcome, _ = _run(app, "job-oom")
    assert outcome.error is not None and outcome.error.code is ErrorCode.ENGINE_ERROR
    engine.error = None
    outcome, _ = _run(app, "job-after-oom")  # the same process and engine go on
    assert outcome.result is not None


def test_an_engine_that_cannot_load_is_unavailable_and_retried_next_job(
    app: Celery, runtime: WorkerRuntime, counter: FakeCounter
) -> None:
    attempts = []

    def broken(settings: WorkerSettings) -> Any:
        attempts.append(1)
        raise OSError("no such model folder")

    runtime.loaders[SDXL] = broken
    for job_id in ("job-u1", "job-u2"):
        outcome, _ = _run(app, job_id)
        assert outcome.error is not None and outcome.error.code is ErrorCode.ENGINE_UNAVAILABLE
    assert len(attempts) == 2


def test_the_soft_time_limit_during_the_engine_load_is_a_timeout(
    app: Celery, runtime: WorkerRuntime, counter: FakeCounter
) -> None:
    # Not "the engine could not be loaded, an admin has to check its model": nothing is wrong with it.
    def slow_loader(settings: WorkerSettings) -> Any:
        raise SoftTimeLimitExceeded()

    runtime.loaders[SDXL] = slow_loader
    outcome, _ = _run(app, "job-load-timeout")
    assert outcome.error is not None and outcome.error.code is ErrorCode.TIMEOUT


def test_redelivery_past_the_bound_is_refused_without_running(
    app: Celery, fake_engine: FakeEngine, counter: FakeCounter
) -> None:
    # max_redeliveries=2: starts 1, 2 and 3 run; the 4th returns an error instead.
    for _ in range(3):
        outcome, _ = _run(app, "job-poison")
        assert outcome.result is not None
    outcome, _ = _run(app, "job-poison")
    assert outcome.error is not None and outcome.error.code is ErrorCode.ENGINE_ERROR
    assert fake_engine.runs == 3


def test_a_counter_failure_does_not_lose_the_job(
    app: Celery, runtime: WorkerRuntime, fake_engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Down(DeliveryCounter):
        def incr(self, job_id: str) -> int:
            raise ConnectionError("redis is down")

    monkeypatch.setattr(runtime, "delivery_counter", Down)
    outcome, _ = _run(app, "job-counter-down")
    assert outcome.result is not None


def test_a_revoked_job_is_cancelled_before_it_starts(
    app: Celery, fake_engine: FakeEngine, counter: FakeCounter
) -> None:
    from celery.worker import state

    state.revoked.add("job-revoked")
    try:
        outcome, _ = _run(app, "job-revoked")
    finally:
        state.revoked.discard("job-revoked")
    assert outcome.error is not None and outcome.error.code is ErrorCode.CANCELLED
    assert fake_engine.runs == 0


# --------------------------------------------------------------------------- through Celery's tracer


def _traced(app: Celery, job_id: str, *, redelivered: bool = False) -> Any:
    """Run the SDXL task for ``job_id`` as a pool process does: through Celery's tracer, which
    keeps the task's states (STARTED, the outcome) in the app's result backend."""
    from celery.app.trace import build_tracer

    task = app.tasks[TASK_SDXL]
    tracer = build_tracer(task.name, task, app=app, eager=False, hostname="mirage-gpu@test", propagate=False)
    request = {"id": job_id, "hostname": "mirage-gpu@test", "delivery_info": {"redelivered": redelivered}}
    return tracer(job_id, [_job(job_id)], {}, request)


def test_a_traced_job_is_marked_started_before_it_runs_then_succeeds(
    app: Celery, fake_engine: FakeEngine, counter: FakeCounter, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    real_store = app.backend.store_result

    def recording_store(task_id: str, result: Any, state: str, *args: Any, **kwargs: Any) -> Any:
        seen.append(state)
        return real_store(task_id, result, state, *args, **kwargs)

    monkeypatch.setattr(app.backend, "store_result", recording_store)
    _traced(app, "job-traced")
    assert fake_engine.runs == 1
    assert seen[0] == states.STARTED and seen[-1] == states.SUCCESS
    assert set(seen[1:-1]) <= {PROGRESS_STATE}
    assert AsyncResult("job-traced", app=app).state == states.SUCCESS


def test_a_copy_of_a_failed_job_neither_runs_nor_overwrites_its_failure(
    app: Celery, fake_engine: FakeEngine, counter: FakeCounter
) -> None:
    # The job ended in FAILURE and its worker died before acknowledging the message (or the
    # supervisor's re-send finished first): the broker hands the message out again. Celery skips
    # only a copy of a SUCCESS; this one must not run either, nor replace the member's reason.
    app.backend.mark_as_failure("job-failed", JobFailed("timeout", tasks.TIMEOUT_MESSAGE))
    _traced(app, "job-failed", redelivered=True)
    assert fake_engine.runs == 0
    stored = AsyncResult("job-failed", app=app)
    assert stored.state == states.FAILURE
    failed = JobFailed.from_exception(stored.result)
    assert failed is not None and (failed.code, failed.message) == ("timeout", tasks.TIMEOUT_MESSAGE)
    assert counter.counts == {}  # not a start


def test_a_copy_of_a_revoked_job_is_not_run(
    app: Celery, fake_engine: FakeEngine, counter: FakeCounter
) -> None:
    # Revoked while queued; the copy reaches a worker that never heard the revoke (started later).
    app.backend.mark_as_revoked("job-revoked-copy", "revoked")
    _traced(app, "job-revoked-copy")
    assert fake_engine.runs == 0
    assert AsyncResult("job-revoked-copy", app=app).state == states.REVOKED


def _result_store_down_for(app: Celery, monkeypatch: pytest.MonkeyPatch, operations: int) -> None:
    """The app's result store refuses its next ``operations`` reads and writes, as a restarting Redis
    does; Celery retries each operation once, without sleeping."""
    backend = app.backend
    left = [operations]

    def flaky(real: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            if left[0] > 0:
                left[0] -= 1
                raise ConnectionError("result store restarting")
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(backend, "_store_result", flaky(backend._store_result))
    monkeypatch.setattr(backend, "_get_task_meta_for", flaky(backend._get_task_meta_for))
    monkeypatch.setattr(backend, "exception_safe_to_retry", lambda exc: isinstance(exc, ConnectionError))
    monkeypatch.setattr(backend, "max_retries", 1)
    monkeypatch.setattr(backend, "_sleep", lambda seconds: None)
    monkeypatch.setattr(tasks, "_pause", lambda seconds: None, raising=False)


def test_a_result_store_outage_when_a_job_starts_holds_the_job_instead_of_failing_it(
    app: Celery, fake_engine: FakeEngine, counter: FakeCounter, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Production stores results in Redis and queues jobs in RabbitMQ: a worker can take a job while
    # Redis restarts. Celery's own STARTED write then gave up after its retries, failed the task
    # and acknowledged the message: the job was refunded, or lost when even the failure could not
    # be stored.
    _result_store_down_for(app, monkeypatch, operations=3)
    _traced(app, "job-outage")
    assert fake_engine.runs == 1
    assert AsyncResult("job-outage", app=app).state == states.SUCCESS


def test_a_result_store_that_stays_down_hands_the_job_back_to_the_broker(
    app: Celery, fake_engine: FakeEngine, counter: FakeCounter, monkeypatch: pytest.MonkeyPatch
) -> None:
    _result_store_down_for(app, monkeypatch, operations=1_000)
    monkeypatch.setattr(tasks, "RESULT_STORE_PATIENCE_S", 0.0, raising=False)
    traced = _traced(app, "job-store-gone")
    assert traced.info.state == states.REJECTED
    rejected = traced.info.retval
    assert isinstance(rejected, Reject) and rejected.requeue  # back in the queue, for a later try
    assert fake_engine.runs == 0 and counter.counts == {}


# --------------------------------------------------------------------------- safety verdicts


class FakeClassifier:
    """Flags every image whose mean red is at least 60 (tiles 2 and 3 of ``tile``); counts calls."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def classify(self, images: Any) -> list[SafetyVerdict]:
        self.calls.append(len(images))
        verdicts = []
        for image in images:
            red = image.resize((1, 1), Image.Resampling.BOX).getpixel((0, 0))[0]
            unsafe = red >= 60
            verdicts.append(
                SafetyVerdict(label="nsfw" if unsafe else "normal", score=red / 255, unsafe=unsafe)
            )
        return verdicts


def _classified_app(fake_engine: FakeEngine, classifier: Any, **overrides: Any) -> Celery:
    app = make_celery(_settings(safety_model="fake-classifier", **overrides))
    runtime = runtime_of(app)
    runtime.loaders[SDXL] = lambda settings: fake_engine
    runtime.loaders[OPENAI] = lambda settings: fake_engine
    runtime.safety_loader = classifier
    runtime.delivery_counter = FakeCounter  # type: ignore[method-assign]
    return app


def test_sdxl_results_carry_one_verdict_per_tile_in_order(fake_engine: FakeEngine) -> None:
    classifier = FakeClassifier()
    devices: list[str] = []

    def load(settings: WorkerSettings, device: str) -> FakeClassifier:
        devices.append(device)
        return classifier

    app = _classified_app(fake_engine, load)
    outcome, _ = _run(app, "job-safe")
    assert outcome.result is not None, outcome.error
    assert [v.unsafe for v in outcome.result.safety] == [False, False, True, True]  # U1..U4
    assert classifier.calls == [4]  # one batch per job
    assert "safety" in outcome.result.timings.phases
    _run(app, "job-safe-2")
    assert devices == ["cpu"]  # loaded once per process, on the engine's device


def test_openai_results_are_not_classified_by_the_worker(fake_engine: FakeEngine) -> None:
    classifier = FakeClassifier()
    app = _classified_app(fake_engine, lambda settings, device: classifier)
    task = FakeTask(app, "job-api")
    outcome = TaskOutcome.model_validate(tasks.run_job(task, OPENAI, _job("job-api")))  # type: ignore[arg-type]
    assert outcome.result is not None and outcome.result.safety == []
    assert classifier.calls == []


def test_without_a_safety_model_nothing_is_classified(
    app: Celery, runtime: WorkerRuntime, fake_engine: FakeEngine, counter: FakeCounter
) -> None:
    runtime.safety_loader = lambda settings, device: pytest.fail("no classifier is configured")
    outcome, _ = _run(app, "job-unclassified")
    assert outcome.result is not None and outcome.result.safety == []


def test_a_classifier_that_cannot_load_withholds_the_result(fake_engine: FakeEngine) -> None:
    def broken(settings: WorkerSettings, device: str) -> Any:
        raise WorkerError(ErrorCode.ENGINE_UNAVAILABLE, "The safety classifier could not be loaded.")

    outcome, _ = _run(_classified_app(fake_engine, broken), "job-no-classifier")
    assert outcome.result is None
    assert outcome.error is not None and outcome.error.code is ErrorCode.ENGINE_UNAVAILABLE


@pytest.mark.slow
def test_the_real_classifier_scores_a_grid(fake_engine: FakeEngine, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from workers.tiny_safety import make_tiny_safety_classifier

    model = make_tiny_safety_classifier(tmp_path / "safety", probabilities={"normal": 0.2, "nsfw": 0.8})
    app = make_celery(_settings(safety_model=str(model)))
    runtime = runtime_of(app)
    runtime.loaders[SDXL] = lambda settings: fake_engine
    runtime.delivery_counter = FakeCounter  # type: ignore[method-assign]
    outcome, _ = _run(app, "job-real-safety")
    assert outcome.result is not None, outcome.error
    assert [(v.label, v.unsafe) for v in outcome.result.safety] == [("nsfw", True)] * 4
    assert all(v.score == pytest.approx(0.8, abs=1e-3) for v in outcome.result.safety)


# --------------------------------------------------------------------------- the runtime


def test_the_engine_is_loaded_once_per_process_and_shared_by_threads(runtime: WorkerRuntime) -> None:
    loads: list[int] = []

    def slow_loader(settings: WorkerSettings) -> FakeEngine:
        loads.append(1)
        time.sleep(0.2)  # a slow load: the window in which the other threads must wait
        return FakeEngine()

    runtime.loaders[OPENAI] = slow_loader
    got: list[tuple[Any, float]] = []
    threads = [threading.Thread(target=lambda: got.append(runtime.engine(OPENAI))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(loads) == 1
    assert len({id(engine) for engine, _ in got}) == 1
    assert sorted(load_s > 0 for _, load_s in got) == [False] * 7 + [True]  # one job paid the load


def test_an_engine_inherited_across_a_fork_is_never_reused(
    runtime: WorkerRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime.loaders[OPENAI] = lambda settings: FakeEngine()
    first, _ = runtime.engine(OPENAI)
    monkeypatch.setattr(os, "getpid", lambda: 999_999)  # as if in a forked child
    second, _ = runtime.engine(OPENAI)
    assert second is not first  # CUDA does not survive fork


def test_load_time_paid_by_a_job_is_in_its_timings(
    app: Celery, runtime: WorkerRuntime, counter: FakeCounter
) -> None:
    def loader(settings: WorkerSettings) -> FakeEngine:
        time.sleep(0.05)  # a measurable load
        return FakeEngine()

    runtime.loaders[SDXL] = loader
    cold, _ = _run(app, "job-cold")
    warm, _ = _run(app, "job-warm")
    assert cold.result is not None and warm.result is not None
    assert cold.result.timings.load_s >= 0.05
    assert warm.result.timings.load_s == 0.0


def test_warm_up_loads_the_served_engines_and_survives_failures(
    runtime: WorkerRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded: list[str] = []
    runtime.loaders[SDXL] = lambda settings: (_ for _ in ()).throw(OSError("no model"))
    runtime.loaders[OPENAI] = lambda settings: loaded.append(OPENAI) or FakeEngine()  # type: ignore[func-returns-value]
    monkeypatch.setenv(tasks.ENV_WORKER_QUEUES, "gpu,api")
    assert tasks.served_engines(runtime) == [SDXL, OPENAI]
    runtime.warm_up(tasks.served_engines(runtime))  # the SDXL failure is logged, not raised
    assert loaded == [OPENAI]
    monkeypatch.setenv(tasks.ENV_WORKER_QUEUES, "api")
    assert tasks.served_engines(runtime) == [OPENAI]


def test_a_gated_engine_retries_its_load_until_it_succeeds_and_is_marked_ready(
    runtime: WorkerRuntime, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from workers.runtime import ENV_READY_DIR, ready_pids

    monkeypatch.setenv(ENV_READY_DIR, str(tmp_path / "ready"))
    attempts: list[int] = []

    def flaky(settings: WorkerSettings) -> FakeEngine:
        attempts.append(1)
        if len(attempts) < 3:
            raise WorkerError(ErrorCode.ENGINE_UNAVAILABLE, "SDXL model folder '/m' does not exist.")
        return FakeEngine()

    runtime.loaders[SDXL] = flaky
    slept: list[float] = []
    with caplog.at_level("ERROR", logger="workers.runtime"):
        runtime.warm_up([SDXL], retry=True, sleep=slept.append)
    assert len(attempts) == 3 and slept == [runtime.settings.model_retry_s] * 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2
    assert "warm-up of the sdxl engine failed: SDXL model folder '/m' does not exist" in errors[0]
    assert "takes no sdxl jobs until it loads" in errors[0]
    assert ready_pids(SDXL) == [os.getpid()]


def test_a_failed_outcome_raises_job_failed_and_a_result_is_returned() -> None:
    ok = {"result": None, "error": None}
    assert tasks.finish_task(SDXL, ok) is ok
    failed = {"result": None, "error": {"job_id": "j", "code": "bad_input", "message": "Unreadable image."}}
    with pytest.raises(JobFailed) as info:
        tasks.finish_task(SDXL, failed)
    assert info.value.args == ("bad_input", "Unreadable image.")
    assert info.value.error_code is ErrorCode.BAD_INPUT
