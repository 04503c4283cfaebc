"""Dispatch: tasks are sent to Celery by name, on the engine's queue, with the job id as task id."""

from __future__ import annotations

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
