"""``/imagine`` against the fake Discord: acceptance, refusals, engines and their queues."""

from __future__ import annotations

import base64
import io
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from bot.interactions import DATABASE_UNAVAILABLE
from bot.models import JobInput, JobStatus
from tests.botutil import (
    EPHEMERAL,
    FakeDispatcher,
    Harness,
    bot_harness,
    credits_used,
    custom_ids,
    png_bytes,
    private_followup,
    refused_for_free,
)
from workers.schema import JobKind

pytestmark = pytest.mark.timeout(60)


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


# --- plans, notes, images, banned words and speed classes --------------------------------------


async def test_the_parser_notes_are_shown_privately(h: Harness) -> None:
    inter = await h.imagine("a red fox --exp 20")
    await h.dispatcher.wait_sent(1)
    note = await private_followup(h, inter)
    assert "`--exp`" in note["content"] and note["content"].startswith("-# ")


async def test_an_unmapped_model_profile_runs_on_the_default_model_with_a_note(h: Harness) -> None:
    inter = await h.imagine("a red fox --v 6.1")
    [request] = await h.dispatcher.wait_sent(1)
    assert request.params.model_profile == "6.1" and h.dispatcher.routed[request.job_id] == "gpu"
    note = await private_followup(h, inter)
    assert "`--v 6.1` is not set up on this server; the default model is used." in note["content"]


async def test_an_attachment_becomes_the_jobs_stored_input_and_reference(h: Harness) -> None:
    picture = h.fake.upload_attachment("cat.png", png_bytes(32, 24))
    inter = await h.fake.slash("imagine", {"prompt": "a cat in a hat", "image": picture})
    [request] = await h.dispatcher.wait_sent(1)
    job = await h.job_for(inter)
    async with h.sessions() as session:
        rows = (await session.scalars(select(JobInput).where(JobInput.job_id == job.id))).all()
    assert [(row.role, row.index) for row in rows] == [("image", 0)]
    assert PILImage.open(io.BytesIO(await h.store.get(rows[0].key))).size == (32, 24)
    [reference] = request.references["prompt"]
    assert PILImage.open(io.BytesIO(base64.b64decode(reference))).size == (32, 24)


async def test_iw_with_an_attachment_is_not_noted_as_without_effect(h: Harness) -> None:
    # The attachment is an image prompt, so --iw weighs it; only the --sw note applies.
    picture = h.fake.upload_attachment("cat.png", png_bytes(32, 24))
    inter = await h.fake.slash("imagine", {"prompt": "a cat --iw 2 --sw 100", "image": picture})
    [request] = await h.dispatcher.wait_sent(1)
    assert request.params.image_weight == 2
    note = (await private_followup(h, inter))["content"]
    assert "`--sw` has no effect" in note and "--iw" not in note


async def test_an_attachment_that_is_not_an_image_is_refused_by_name_and_free(h: Harness) -> None:
    notes = h.fake.upload_attachment("notes.txt", b"just text", "text/plain")
    refusal = await refused_for_free(h, "imagine", {"prompt": "a cat", "image": notes})
    assert "notes.txt" in refusal


async def test_banned_words_are_refused_by_name_before_anything_is_charged(
    tmp_path: Path, sqlite_url: str
) -> None:
    async with bot_harness(tmp_path, sqlite_url, FakeDispatcher(), banned_words="gore, bare skin") as h:
        inter = await h.imagine("a {calm, gore} scene")
        callback = await inter.callback()
        assert callback.callback_type == 4 and callback.message_payload["flags"] & EPHEMERAL
        assert "`gore`" in callback.message_payload["content"]
        assert await h.job_count() == 0 and await credits_used(h, h.fake.user.id) == 0


async def test_relax_costs_less_and_turbo_is_released_first(tmp_path: Path, sqlite_url: str) -> None:
    async with bot_harness(
        tmp_path, sqlite_url, FakeDispatcher(), max_running_per_member=1, relax_cost_factor=0
    ) as h:
        first = await h.job_for(await h.imagine("first --fast"))
        # Running before the others exist: released later, turbo would be picked over it.
        await h.dispatcher.wait_sent(1)
        relaxed = await h.job_for(await h.imagine("later --relax"))
        turbo = await h.job_for(await h.imagine("urgent --turbo"))
        assert (first.cost, relaxed.cost, turbo.cost) == (1, 0, 1)
        h.dispatcher.succeed(first.id)
        h.bot.tracker.wake()
        await h.wait_job(turbo.id, lambda j: j.status != JobStatus.WAITING)
        assert (await h.job(relaxed.id)).status == JobStatus.WAITING
        assert [r.job_id for r in h.dispatcher.sent] == [first.id, turbo.id]


async def test_preferences_that_cannot_be_read_are_said_so_and_nothing_is_charged(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def database_down(*_args: Any, **_kwargs: Any) -> Any:
        raise OperationalError("SELECT", {}, ConnectionRefusedError("database down"))

    # discord.py loaded the cog as an extension: patch the module it runs.
    monkeypatch.setattr(sys.modules["bot.cogs.imagine"], "prompting_context", database_down)
    inter = await h.imagine("a red fox")
    callback = await inter.callback()
    assert callback.callback_type == 4 and callback.message_payload["content"] == DATABASE_UNAVAILABLE
    assert await h.job_count() == 0 and h.dispatcher.sent == []


async def test_image_urls_and_references_are_fetched_stored_and_sent_by_role(h: Harness) -> None:
    imagine_cog: Any = h.bot.get_cog("Imagine")
    imagine_cog.allow_addresses = (f"127.0.0.1:{h.fake.port}",)
    first = h.fake.upload_attachment("first.png", png_bytes(20, 10))["url"]
    style = h.fake.upload_attachment("style.png", png_bytes(12, 12))["url"]
    inter = await h.imagine(f"{first} a lighthouse --sref {style} --seed 3")
    [request] = await h.dispatcher.wait_sent(1)
    sizes = {
        role: [PILImage.open(io.BytesIO(base64.b64decode(data))).size for data in pictures]
        for role, pictures in request.references.items()
    }
    assert sizes == {"prompt": [(20, 10)], "style": [(12, 12)]}
    assert (await h.job_for(inter)).prompt == "a lighthouse"


async def test_an_image_url_that_cannot_be_fetched_is_named_and_nothing_is_charged(h: Harness) -> None:
    imagine_cog: Any = h.bot.get_cog("Imagine")
    imagine_cog.allow_addresses = (f"127.0.0.1:{h.fake.port}",)
    missing = f"{h.fake.base_url}/attachments/1/2/gone.png"
    inter = await h.imagine(f"a lighthouse --cref {missing}")
    refusal = await private_followup(h, inter)
    assert "--cref image 1" in refusal["content"] and "gone.png" in refusal["content"]
    assert "Nothing was charged" in refusal["content"]
    assert await h.job_count() == 0 and await credits_used(h, h.fake.user.id) == 0


async def test_a_mapped_profile_and_the_house_style_reach_the_worker_message_only(
    tmp_path: Path, sqlite_url: str
) -> None:
    profiles = '{"7": {"queue": "gpu-v7", "loras": {"detail": 0.5}, "style": "cinematic"}}'
    dispatcher = FakeDispatcher()
    dispatcher.profile_queues = {}  # type: ignore[attr-defined]
    async with bot_harness(
        tmp_path, sqlite_url, dispatcher, model_profiles=profiles, house_style="anime"
    ) as h:
        assert dispatcher.profile_queues == {"7": "gpu-v7"}  # type: ignore[attr-defined]
        v7 = await h.job_for(await h.imagine("a fox --v 7"))
        housed = await h.job_for(await h.imagine("a cat"))
        raw = await h.job_for(await h.imagine("a dog --style raw"))
        requests = {r.job_id: r.params for r in await h.dispatcher.wait_sent(3)}
        assert v7.prompt == "a fox" and requests[v7.id].prompt == "a fox <lora:detail:0.5>"
        assert requests[v7.id].style == "cinematic" and requests[housed.id].style == "anime"
        assert requests[raw.id].style is None and requests[raw.id].parts == ()
        assert "anime" not in str(housed.params.get("style"))  # the stored job keeps what was typed
