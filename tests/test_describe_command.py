"""``/describe`` through the fake Discord: a picture in, four prompts out, and their buttons.

The fake dispatcher stands in for the engine's describe task: it records the request (the
picture as ``input_image``) and answers with a ``DescribeResult``, as the worker would.
"""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path
from typing import Any

import pytest
from PIL import Image as PILImage
from sqlalchemy import select, update

from bot.banned_words import BannedWordRules
from bot.buttons import NOT_YOURS
from bot.describe_buttons import NUMBERS
from bot.dispatch import SUCCESS, TaskState
from bot.models import Job, JobStatus, Member
from tests.botutil import (
    EPHEMERAL,
    FakeDispatcher,
    Harness,
    attachment_bytes,
    bot_harness,
    credits_used,
    custom_ids,
    has_result,
    png_bytes,
    refused_for_free,
    reply_of,
)
from tests.fakes import FakeInteraction
from workers.schema import DescribeResult, JobKind, TaskOutcome

pytestmark = pytest.mark.timeout(60)

PROMPTS = [
    "a red fox in fresh snow, soft light --ar 3:2",
    "watercolour of a fox in a winter forest --ar 3:2",
    "a fox, photograph, shallow depth of field --ar 3:2",
    "minimal illustration of an orange fox on white --ar 3:2",
]


def describe_done(h: Harness, job_id: str, prompts: list[str] = PROMPTS) -> None:
    """Finish a describe task as the worker does: a ``TaskOutcome`` carrying the suggestions."""
    described = DescribeResult(job_id=job_id, prompts=prompts, aspect="3:2", model="tiny-captioner")
    outcome = TaskOutcome(describe=described).model_dump(mode="json")
    h.dispatcher.state[job_id] = TaskState(job_id, SUCCESS, outcome)
    assert h.bot is not None
    h.bot.tracker.wake()


async def describe_picture(h: Harness) -> tuple[FakeInteraction, Job, dict[str, Any]]:
    """``/describe image:<a 48x32 picture>`` answered by the fake worker."""
    picture = h.fake.upload_attachment("fox.png", png_bytes(48, 32, (200, 90, 20)))
    inter = await h.fake.slash("describe", {"image": picture})
    job = await h.job_for(inter)
    await h.dispatcher.wait_sent(1)
    describe_done(h, job.id)
    message = await inter.wait_original(lambda m: NUMBERS[0] in (m.get("content") or ""))
    return inter, await h.wait_job(job.id, lambda j: j.message_id is not None), message


async def test_describe_sends_the_picture_and_shows_four_numbered_prompts(h: Harness) -> None:
    _inter, job, message = await describe_picture(h)
    [request] = h.dispatcher.sent
    assert request.kind == JobKind.DESCRIBE and request.job_id == job.id
    picture = PILImage.open(io.BytesIO(base64.b64decode(request.input_image or "")))
    assert picture.size == (48, 32)
    assert request.references == {}  # the picture goes as input_image, not as an image prompt
    assert job.kind == JobKind.DESCRIBE and job.status == JobStatus.DONE and job.cost == 0
    lines = message["content"].splitlines()
    assert lines[0].startswith("**Describe** - <@")
    assert [line.split(" ", 1)[0] for line in lines[1:]] == list(NUMBERS)
    assert lines[1] == f"{NUMBERS[0]} {PROMPTS[0]}"  # as it can be pasted back into /imagine
    assert custom_ids(message) == [f"mj:desc:{job.id}:{what}" for what in ("1", "2", "3", "4", "r", "all")]
    assert await credits_used(h, h.fake.user.id) == 0  # COST_DESCRIBE is 0 by default
    [shown] = message["attachments"]  # the picture, above its prompts
    assert PILImage.open(io.BytesIO(await attachment_bytes(h.fake, message))).size == (48, 32)
    assert shown["filename"].endswith(".png")


async def test_pressing_a_number_imagines_that_prompt_and_delivers_a_grid(h: Harness) -> None:
    _inter, job, message = await describe_picture(h)
    press = await h.fake.press(f"mj:desc:{job.id}:2", message)
    imagine = await h.wait_job((await h.job_for(press)).id, lambda j: j.status == JobStatus.QUEUED)
    assert imagine.kind == JobKind.IMAGINE and imagine.cost == 1
    request = h.dispatcher.request(imagine.id)
    assert request.params.prompt == "watercolour of a fox in a winter forest"
    assert request.params.aspect == (3, 2)  # the picture's --ar came with the prompt
    h.dispatcher.succeed(imagine.id)
    assert h.bot is not None
    h.bot.tracker.wake()
    grid = await press.wait_original(has_result)
    assert f"mj:u:{imagine.id}:1" in custom_ids(grid)
    assert await credits_used(h, h.fake.user.id) == 1  # charged like any /imagine


async def test_describe_again_sends_the_same_picture_as_a_new_job(h: Harness) -> None:
    _inter, job, message = await describe_picture(h)
    again = await h.fake.press(f"mj:desc:{job.id}:r", message)
    second = await h.job_for(again)
    [first_request, second_request] = await h.dispatcher.wait_sent(2)
    assert second.id != job.id and second.kind == JobKind.DESCRIBE
    assert second_request.kind == JobKind.DESCRIBE
    assert second_request.input_image == first_request.input_image


async def test_imagine_all_asks_first_then_starts_four_jobs(h: Harness) -> None:
    _inter, job, message = await describe_picture(h)
    press = await h.fake.press(f"mj:desc:{job.id}:all", message)
    question = await press.wait_original(lambda m: "Start them?" in (m.get("content") or ""))
    assert question["flags"] & EPHEMERAL and await h.job_count() == 1  # nothing started yet
    [yes] = [cid for cid in custom_ids(question) if cid.endswith(":yes")]
    await h.fake.press(yes, question)
    async with asyncio.timeout(10):
        while await h.job_count() < 5:  # noqa: ASYNC110  (rows the bot writes: no event to wait on)
            await asyncio.sleep(0.02)
    async with h.sessions() as session:
        rows = (await session.scalars(select(Job).where(Job.kind == JobKind.IMAGINE.value))).all()
    assert sorted(row.prompt for row in rows) == sorted(text.removesuffix(" --ar 3:2") for text in PROMPTS)
    assert await credits_used(h, h.fake.user.id) == 4


@pytest.mark.parametrize(
    "options",
    [{}, {"link": "https://example.com/fox.png", "image": "attach"}],
    ids=["neither", "both"],
)
async def test_describe_needs_exactly_one_picture(h: Harness, options: dict[str, Any]) -> None:
    if options.get("image") == "attach":
        options = {**options, "image": h.fake.upload_attachment("fox.png", png_bytes(8, 8))}
    inter = await h.fake.slash("describe", options)
    callback = await inter.callback()
    assert callback.callback_type == 4 and callback.message_payload["flags"] & EPHEMERAL
    assert "one picture" in callback.message_payload["content"]
    assert await h.job_count() == 0


async def test_a_file_that_is_not_a_picture_is_refused_and_free(h: Harness) -> None:
    notes = h.fake.upload_attachment("notes.txt", b"just text", "text/plain")
    refusal = await refused_for_free(h, "describe", {"image": notes})
    assert "notes.txt" in refusal


async def test_a_link_that_points_inside_the_network_is_refused(h: Harness) -> None:
    inter = await h.fake.slash("describe", {"link": "http://127.0.0.1:9/fox.png"})
    refusal = await h.fake.wait_for_request(
        lambda r: r.interaction_token == inter.token and r.route == "webhook_execute"
    )
    assert "can't be used" in refusal.message_payload["content"]
    assert await h.job_count() == 0


async def private_answer(h: Harness, press: FakeInteraction, text: str) -> dict[str, Any]:
    """The ephemeral answer to a press (a reply or a follow-up) containing ``text``."""
    answer = await h.fake.wait_for_request(
        lambda r: r.interaction_token == press.token and text in str(r.message_payload.get("content"))
    )
    assert answer.message_payload["flags"] & EPHEMERAL
    return answer.message_payload


async def test_nobody_else_can_use_the_buttons_of_a_stealth_describe(h: Harness) -> None:
    await reply_of(h, await h.fake.slash("stealth"))
    _inter, job, message = await describe_picture(h)
    assert job.visibility == "stealth"
    mallory = h.fake.add_member(h.fake.guild, "mallory").user
    for what in ("1", "r", "all"):
        press = await h.fake.press(f"mj:desc:{job.id}:{what}", message, user=mallory)
        await private_answer(h, press, NOT_YOURS)
    # 🔄 would have re-described (and shown) the private picture in mallory's public result.
    await h.settle()
    assert await h.job_count() == 1 and len(h.dispatcher.sent) == 1
    assert await credits_used(h, mallory.id) == 0


async def test_one_unusable_suggestion_does_not_block_the_others(h: Harness) -> None:
    # Stored by an older worker that let braces through: that one suggestion would be two prompts.
    prompts = [*PROMPTS[:3], "a poster reading {hello, world} --ar 3:2"]
    picture = h.fake.upload_attachment("fox.png", png_bytes(48, 32))
    inter = await h.fake.slash("describe", {"image": picture})
    job = await h.job_for(inter)
    await h.dispatcher.wait_sent(1)
    describe_done(h, job.id, prompts)
    message = await inter.wait_original(lambda m: NUMBERS[0] in (m.get("content") or ""))
    press = await h.fake.press(f"mj:desc:{job.id}:1", message)
    imagine = await h.job_for(press)
    assert imagine.kind == JobKind.IMAGINE and imagine.prompt == PROMPTS[0].removesuffix(" --ar 3:2")
    press = await h.fake.press(f"mj:desc:{job.id}:4", message)
    await private_answer(h, press, "Suggestion 4 cannot be used as a prompt")


async def test_an_expensive_suggestion_asks_before_charging(tmp_path: Path, sqlite_url: str) -> None:
    async with bot_harness(tmp_path, sqlite_url, FakeDispatcher(), cost_sdxl_grid=4) as h:
        _inter, job, message = await describe_picture(h)
        press = await h.fake.press(f"mj:desc:{job.id}:2", message)
        question = await press.wait_original(lambda m: "4 credits" in (m.get("content") or ""))
        assert question["flags"] & EPHEMERAL
        await h.settle()
        assert await h.job_count() == 1 and await credits_used(h, h.fake.user.id) == 0
        [yes] = [cid for cid in custom_ids(question) if cid.endswith(":yes")]
        answer = await h.fake.press(yes, question)
        imagine = await h.job_for(answer)
        assert imagine.prompt == "watercolour of a fox in a winter forest" and imagine.cost == 4
        assert await credits_used(h, h.fake.user.id) == 4


async def test_imagine_all_with_a_banned_suggestion_is_refused_before_asking(h: Harness) -> None:
    _inter, job, message = await describe_picture(h)
    assert h.bot is not None
    h.bot.jobs.banned_words = BannedWordRules.from_terms(["watercolour"])
    press = await h.fake.press(f"mj:desc:{job.id}:all", message)
    await private_answer(h, press, "`watercolour`")
    await h.settle()
    assert not any("Start them?" in str(r.message_payload.get("content")) for r in press.requests)
    assert await h.job_count() == 1 and await credits_used(h, h.fake.user.id) == 0


async def test_imagine_all_is_priced_with_the_members_own_engine(h: Harness) -> None:
    _inter, job, message = await describe_picture(h)
    async with h.sessions() as session, session.begin():
        await session.execute(
            update(Member).where(Member.user_id == h.fake.user.id).values(default_engine="openai")
        )
    press = await h.fake.press(f"mj:desc:{job.id}:all", message)
    question = await press.wait_original(lambda m: "Start them?" in (m.get("content") or ""))
    assert "costs 8 credits" in question["content"]  # four OpenAI grids at 2, not four SDXL ones


async def test_a_stealth_describe_stays_stealth_after_the_owner_goes_public(h: Harness) -> None:
    await reply_of(h, await h.fake.slash("stealth"))
    _inter, job, message = await describe_picture(h)
    await reply_of(h, await h.fake.slash("public"))
    # 🔄 as a public job would put the private picture in the gallery, as this job's input.
    again = await h.job_for(await h.fake.press(f"mj:desc:{job.id}:r", message))
    imagine = await h.job_for(await h.fake.press(f"mj:desc:{job.id}:1", message))
    assert again.kind == JobKind.DESCRIBE and again.visibility == "stealth"
    assert imagine.kind == JobKind.IMAGINE and imagine.visibility == "stealth"
