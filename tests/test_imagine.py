"""``/imagine`` against the fake Discord: acceptance, refusals, engines and their queues."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bot.models import JobStatus
from tests.botutil import (
    EPHEMERAL,
    FakeDispatcher,
    Harness,
    bot_harness,
    credits_used,
    custom_ids,
)
from workers.schema import JobKind

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def h(tmp_path: Path, sqlite_url: str) -> Any:
    """A bot over SQLite with a fake dispatcher."""
    async with bot_harness(tmp_path, sqlite_url, FakeDispatcher()) as harness:
        yield harness


async def test_imagine_is_deferred_then_waits(h: Harness) -> None:
    inter = await h.imagine("a red fox in the snow --ar 3:2 --seed 42")
    callback = await inter.callback()
    assert callback.status == 200
    assert callback.callback_type == 5  # deferred: the 3 s deadline is met before any DB work
    message = await inter.wait_original(lambda m: "Waiting to start" in (m.get("content") or ""))
    assert (
        message["content"]
        == f"**a red fox in the snow --ar 3:2 --seed 42** - <@{h.fake.user.id}> (Waiting to start)"
    )
    [request] = await h.dispatcher.wait_sent(1)
    job = await h.job_for(inter)
    assert request.job_id == job.id and request.seed == 42 and request.params.aspect == (3, 2)
    job = await h.wait_job(job.id, lambda j: j.status == JobStatus.QUEUED)
    assert job.cost == 1 and job.kind == JobKind.IMAGINE
    assert job.interaction_token == inter.token and job.application_id == h.fake.application_id


@pytest.mark.parametrize(
    "prompt",
    ["a cat --ar 0:1", "a cat --seed -3", "a cat --chaos 500", "a cat --frobnicate", "--ar 1:1"],
)
async def test_malformed_parameters_are_refused_privately_and_free(h: Harness, prompt: str) -> None:
    inter = await h.imagine(prompt)
    callback = await inter.callback()
    assert callback.callback_type == 4
    data = callback.message_payload
    assert data["flags"] & EPHEMERAL
    assert "`" in data["content"]  # names the parameter
    assert await h.job_count() == 0
    assert await credits_used(h, h.fake.user.id) == 0
    assert h.dispatcher.sent == []


async def test_out_of_credits_is_refused_with_reset_time(tmp_path: Path, db_url: str) -> None:
    async with bot_harness(tmp_path, db_url, FakeDispatcher(), credit_limit=1) as h:
        first = await h.imagine("one")
        await h.job_for(first)
        second = await h.imagine("two")
        refusal = await h.fake.wait_for_request(
            lambda r: r.interaction_token == second.token and r.route == "webhook_execute"
        )
        payload = refusal.message_payload
        assert payload["flags"] & EPHEMERAL
        assert "You have 0 credits left; this costs 1" in payload["content"]
        assert "<t:" in payload["content"] and ":R>" in payload["content"]
        # The public "thinking…" message was removed: nothing public says the member is broke.
        assert (
            any(r.route == "webhook_message_delete" for r in second.requests)
            or second.original_message() is None
        )
        assert await h.job_count() == 1
        assert await credits_used(h, h.fake.user.id) == 1


async def test_openai_jobs_cost_more_and_go_to_the_api_queue(h: Harness) -> None:
    inter = await h.imagine("an oil painting --model dalle")  # the old engine name still works
    job = await h.job_for(inter)
    [request] = await h.dispatcher.wait_sent(1)
    assert job.engine == "openai" and job.cost == 2
    assert h.dispatcher.routed[job.id] == "api"
    assert request.openai_model == h.settings.openai_model
    assert await credits_used(h, h.fake.user.id) == 2
    sdxl = await h.job_for(await h.imagine("a pencil sketch --model sdxl"))
    await h.dispatcher.wait_sent(2)
    assert h.dispatcher.routed[sdxl.id] == "gpu"


async def test_member_default_engine_applies(h: Harness) -> None:
    inter = await h.fake.slash("settings")
    panel = await inter.wait_original(lambda m: bool(m.get("components")))
    press = await h.fake.press(custom_ids(panel)[0], panel, values=["openai"])
    await press.callback()
    job = await h.job_for(await h.imagine("uses my default engine"))
    assert job.engine == "openai"
    job = await h.job_for(await h.imagine("but not here --model sdxl"))
    assert job.engine == "sdxl"
