"""Dispatch: tasks are sent to Celery by name, on the engine's queue, with the job id as task id."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from workers.schema import JobKind

pytestmark = pytest.mark.timeout(60)


async def test_celery_dispatcher_sends_by_name_with_the_job_id() -> None:
    from bot.dispatch import CeleryDispatcher, make_celery_client
    from workers.schema import TASK_OPENAI, TASK_SDXL, Engine, GenerationParams, JobRequest

    app = make_celery_client("memory://", "cache+memory://")
    calls: list[tuple[str, dict[str, Any]]] = []
    app.send_task = lambda name, **kwargs: calls.append((name, kwargs))  # type: ignore[method-assign]
    dispatcher = CeleryDispatcher(app, queues={Engine.SDXL: "gpu-x"})
    request = JobRequest(job_id="j" * 22, kind=JobKind.IMAGINE, params=GenerationParams(prompt="p"), seed=3)
    await dispatcher.send(request, Engine.SDXL)
    await dispatcher.send(request, Engine.OPENAI)
    await dispatcher.close()
    assert calls[0][0] == TASK_SDXL and calls[0][1]["queue"] == "gpu-x" and calls[0][1]["task_id"] == "j" * 22
    assert calls[0][1]["args"] == [request.model_dump(mode="json")]
    assert calls[1][0] == TASK_OPENAI and calls[1][1]["queue"] == "api"


def test_backoff_doubles_up_to_its_cap_and_resets() -> None:
    from bot.dispatch import Backoff

    backoff = Backoff(first_s=0.5, max_s=2.0)
    assert backoff.ready(now=0.0)
    delays = []
    for _ in range(4):
        backoff.failed(now=10.0)
        delays.append(backoff.delay)
    assert delays == [0.5, 1.0, 2.0, 2.0]
    assert not backoff.ready(now=11.0) and backoff.ready(now=12.0)
    backoff.succeeded()
    assert backoff.ready(now=0.0) and backoff.delay == 0.0


async def test_an_unreachable_result_store_reads_as_no_state_never_as_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import bot.dispatch as dispatch

    class DownStore:
        """AsyncResult whose backend is down, as during a Redis restart."""

        reads = 0

        def __init__(self, job_id: str, app: object = None) -> None:
            self.id = job_id

        @property
        def state(self) -> str:
            DownStore.reads += 1
            raise ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(dispatch, "AsyncResult", DownStore)
    dispatcher = dispatch.CeleryDispatcher(dispatch.make_celery_client("memory://", "cache+memory://"))
    try:
        assert await dispatcher.states(["a", "b", "c"]) == {}
        assert DownStore.reads == 1  # the rest of the batch is not tried against a down store
        assert dispatcher.backoff.failures == 1
        assert await dispatcher.states(["a"]) == {}  # backing off: not even tried
        assert DownStore.reads == 1
    finally:
        await dispatcher.close()


async def test_status_shows_the_local_gpu_worker_and_its_model_on_the_embedded_broker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The embedded SQL transport carries no pings: /status reads presence files and the model record."""
    from bot import dispatch
    from workers import presence
    from workers.sdxl import health

    monkeypatch.setenv(health.ENV_HEALTH_FILE, str(tmp_path / "health.json"))
    broker = f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    dispatcher = dispatch.CeleryDispatcher(
        dispatch.make_celery_client(broker, f"db+sqlite:///{tmp_path / 'results.db'}")
    )
    try:
        assert (await dispatcher.worker_status(ping_timeout=0.2)).workers == []
        presence.announce(broker, "gpu-1@box", ["gpu"])  # this (live) process is the worker
        status = await dispatcher.worker_status(ping_timeout=0.2)
        assert status.workers == ["gpu-1@box (queues gpu); SDXL model not loaded yet"]
        health.record(health.LOADED, model="tiny")
        status = await dispatcher.worker_status(ping_timeout=0.2)
        assert status.workers == ["gpu-1@box (queues gpu); SDXL model loaded"]
    finally:
        await dispatcher.close()


def test_only_rabbitmq_publishes_with_confirms() -> None:
    # A job is marked queued when the send returns; on RabbitMQ that must mean "on disk".
    from bot.dispatch import make_celery_client

    amqp = make_celery_client("amqp://guest:guest@127.0.0.1:5672//", "cache+memory://")
    redis_app = make_celery_client("redis://127.0.0.1:6379/0", "cache+memory://")
    assert amqp.conf.broker_transport_options["confirm_publish"] is True
    assert "confirm_publish" not in redis_app.conf.broker_transport_options
