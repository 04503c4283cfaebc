"""``/blend`` through the fake Discord, with real attachments served by the fake's CDN."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image as PILImage
from sqlalchemy import select

from bot.banned_words import BannedWordRules
from bot.models import JobInput, JobStatus
from tests.botutil import (
    EPHEMERAL,
    Harness,
    credits_used,
    custom_ids,
    has_result,
    png_bytes,
    refused_for_free,
)
from workers.schema import JobKind, nearest_bucket

pytestmark = pytest.mark.timeout(60)


def sizes(pictures: list[str]) -> list[tuple[int, int]]:
    return [PILImage.open(io.BytesIO(base64.b64decode(data))).size for data in pictures]


async def test_two_pictures_blend_into_a_grid_with_the_usual_buttons(h: Harness) -> None:
    first = h.fake.upload_attachment("sea.png", png_bytes(40, 30, (20, 60, 200)))
    second = h.fake.upload_attachment("fire.png", png_bytes(24, 24, (220, 80, 10)))
    inter = await h.fake.slash("blend", {"image1": first, "image2": second, "dimensions": "landscape"})
    [request] = await h.dispatcher.wait_sent(1)
    job = await h.job_for(inter)
    assert request.kind == JobKind.BLEND and job.kind == JobKind.BLEND and job.cost == 1
    assert sizes(request.references["prompt"]) == [(40, 30), (24, 24)]  # in the order given
    assert request.params.aspect == (3, 2)
    assert (request.params.width, request.params.height) == nearest_bucket(3, 2)
    async with h.sessions() as session:
        rows = (await session.scalars(select(JobInput).where(JobInput.job_id == job.id))).all()
    assert len(rows) == 2  # stored with the job: the gallery and a reroll find them
    h.dispatcher.succeed(job.id)
    assert h.bot is not None
    h.bot.tracker.wake()
    message = await inter.wait_original(has_result)
    assert message["content"].startswith("**Blend** - <@")
    ids = custom_ids(message)
    assert f"mj:u:{job.id}:1" in ids and f"mj:v:{job.id}:4" in ids and f"mj:r:{job.id}" in ids
    assert await credits_used(h, h.fake.user.id) == 1


async def test_rerolling_a_blend_blends_the_same_pictures_again(h: Harness) -> None:
    pictures = [h.fake.upload_attachment(f"p{i}.png", png_bytes(16 + i, 16)) for i in range(3)]
    inter = await h.fake.slash("blend", {"image1": pictures[0], "image2": pictures[1], "image3": pictures[2]})
    [request] = await h.dispatcher.wait_sent(1)
    job = await h.job_for(inter)
    h.dispatcher.succeed(job.id)
    assert h.bot is not None
    h.bot.tracker.wake()
    message = await inter.wait_original(has_result)
    await h.fake.press(f"mj:r:{job.id}", message)
    [_first, reroll] = await h.dispatcher.wait_sent(2)
    assert reroll.kind == JobKind.BLEND
    assert reroll.references["prompt"] == request.references["prompt"]


async def test_a_picture_that_cannot_be_read_is_refused_by_name_and_free(h: Harness) -> None:
    good = h.fake.upload_attachment("good.png", png_bytes(16, 16))
    broken = h.fake.upload_attachment("broken.png", b"\x89PNG\r\n\x1a\n not really", "image/png")
    refusal = await refused_for_free(h, "blend", {"image1": good, "image2": broken})
    assert "Image 2 (broken.png)" in refusal


async def test_a_button_job_cannot_go_around_banned_words(h: Harness) -> None:
    inter = await h.imagine("a quiet harbour at dawn")
    first = await h.job_for(inter)
    await h.wait_job(first.id, lambda j: j.status == JobStatus.QUEUED)
    h.dispatcher.succeed(first.id)
    assert h.bot is not None
    h.bot.tracker.wake()
    grid = await inter.wait_original(has_result)
    # The owner bans a word after the grid went out: its buttons are held to the new rule.
    h.bot.jobs.banned_words = BannedWordRules.from_terms(["harbour"])
    press = await h.fake.press(f"mj:r:{first.id}", grid)
    refusal = await h.fake.wait_for_request(
        lambda r: r.interaction_token == press.token and "`harbour`" in str(r.message_payload.get("content"))
    )
    assert refusal.message_payload["flags"] & EPHEMERAL
    assert await h.job_count() == 1 and await credits_used(h, h.fake.user.id) == 1
