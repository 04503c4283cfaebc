"""Sending final messages: the channel fallback past the interaction token, retries when Discord is down."""

from __future__ import annotations

import base64
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from bot.describe_buttons import describe_content
from bot.models import Job, JobStatus, utcnow
from bot.results import DESCRIBE_KEY
from bot.sending import TOKEN_LIFETIME, Sender, fit, preview_jpeg, token_alive
from tests.botutil import (
    GRID_IDS,
    Harness,
    custom_ids,
    has_result,
    image_of,
    png_bytes,
)

pytestmark = pytest.mark.timeout(60)


async def test_expired_token_delivers_to_the_channel_with_a_mention(h: Harness) -> None:
    inter = await h.imagine("a very long job")
    job = await h.job_for(inter)
    await h.wait_job(job.id, lambda j: j.status == JobStatus.QUEUED)
    h.fake.expire_token(inter)
    h.dispatcher.succeed(job.id)
    post = await h.fake.wait_for_request(
        lambda r: r.route == "channel_message_create" and r.status == 200, timeout=10
    )
    assert post.path == f"/channels/{h.fake.channel.id}/messages"
    assert post.headers["Authorization"] == "Bot fake-bot-token"
    assert f"<@{h.fake.user.id}>" in post.json["content"]
    assert [int(u) for u in post.json["allowed_mentions"]["users"]] == [h.fake.user.id]
    assert len(post.custom_ids()) == GRID_IDS and post.files
    job = await h.wait_job(job.id, lambda j: j.message_id is not None)
    assert job.delivered and job.message_id == int(post.response["id"])


async def test_a_channel_closed_to_the_bot_gets_the_result_by_dm(h: Harness) -> None:
    # A long job outlived its token, and meanwhile the bot lost the right to post in the channel:
    # the member still gets the result, buttons included, in their DMs.
    inter = await h.imagine("a job for a closed channel")
    job = await h.job_for(inter)
    await h.wait_job(job.id, lambda j: j.status == JobStatus.QUEUED)
    h.fake.expire_token(inter)
    h.fake.fail_next(
        "POST",
        rf"^/channels/{h.fake.channel.id}/messages",
        403,
        {"message": "Missing Permissions", "code": 50013},
    )
    h.dispatcher.succeed(job.id)
    await h.fake.wait_for_request(lambda r: r.route == "create_dm" and r.status == 200, timeout=30)
    post = await h.fake.wait_for_request(
        lambda r: r.route == "channel_message_create" and r.status == 200, timeout=30
    )
    assert post.path != f"/channels/{h.fake.channel.id}/messages"
    assert len(post.custom_ids()) == GRID_IDS and post.files
    assert post.json["allowed_mentions"]["parse"] == []
    job = await h.wait_job(job.id, lambda j: j.message_id is not None)
    assert job.delivered and job.message_id == int(post.response["id"])


async def test_delivery_retries_when_discord_is_down(h: Harness) -> None:
    inter = await h.imagine("flaky discord")
    job = await h.job_for(inter)
    await h.wait_job(job.id, lambda j: j.status == JobStatus.QUEUED)
    h.fake.fail_next("PATCH", r"^/webhooks/", 400, {"message": "nope", "code": 0}, times=1)
    h.dispatcher.succeed(job.id)
    await h.wait_job(job.id, lambda j: j.status == JobStatus.DONE and not j.delivered)
    # The claim was released; the tracker's retry (after a short backoff) delivers it.
    message = await inter.wait_original(has_result, timeout=10)
    assert len(custom_ids(message)) == GRID_IDS
    sends = [r for r in inter.requests if r.route == "webhook_message_edit" and r.files]
    assert len([r for r in sends if r.status == 200]) == 1  # delivered exactly once


async def test_a_longest_prompt_is_still_delivered(h: Harness) -> None:
    # 1500 characters of prompt and 1500 of --no, all markdown: escaped, the line would be 6000
    # characters, and Discord refuses content over 2000 (400/50035) on every retry, for ever.
    inter = await h.imagine("_" * 1500 + " --no " + "*" * 1500)
    job = await h.job_for(inter)
    await h.wait_job(job.id, lambda j: j.status == JobStatus.QUEUED)
    h.dispatcher.succeed(job.id)
    message = await inter.wait_original(has_result, timeout=60)
    assert len(message["content"]) <= 2000 and message["content"].startswith("**\\_")
    assert not [r for r in inter.requests if r.status == 400]  # the waiting edit fitted too


async def test_a_rate_limited_progress_edit_does_not_hold_back_the_result(h: Harness) -> None:
    inter = await h.imagine("a busy route")
    job = await h.job_for(inter)
    await h.wait_job(job.id, lambda j: j.status == JobStatus.QUEUED)
    await inter.wait_original(lambda m: "(Waiting to start)" in (m.get("content") or ""))
    # discord.py sleeps out a 429 (or a 5xx: 1+3+5+7+9 s) inside the progress edit, which holds
    # the job's delivery lock: a courtesy edit of a stale percentage must not keep the result.
    # An hour's retry_after: the result can only arrive within the wait below if it does not
    # queue behind that edit.
    h.fake.fail_next("PATCH", r"^/webhooks/", 429, retry_after=3600)
    h.dispatcher.start(job.id, 40)
    await h.fake.wait_for_request(lambda r: r.status == 429, timeout=60)
    h.dispatcher.succeed(job.id)
    assert h.bot is not None
    h.bot.tracker.wake()
    await inter.wait_original(has_result, timeout=60)


async def test_content_over_discords_limit_is_cut_rather_than_refused() -> None:
    # Discord refuses content over 2000 characters on every retry: whatever a caller builds is
    # cut (never half an escape) rather than lost. /describe's own answer is bounded after escaping.
    sent: list[dict[str, Any]] = []

    async def send(**kwargs: Any) -> Any:
        sent.append(kwargs)
        return SimpleNamespace(id=7)

    bot: Any = SimpleNamespace(get_partial_messageable=lambda *_args, **_kwargs: SimpleNamespace(send=send))
    prompts = ["a_b*" * 112] * 4
    job = Job(
        id="J" * 22, user_id=42, channel_id=5, kind="describe", params={DESCRIBE_KEY: {"prompts": prompts}}
    )
    assert len(describe_content(job)) <= 2000  # bounded after escaping
    content = describe_content(job) + "\n" + "\\_" * 1000
    assert await Sender(bot).send_final(job, content=content, image=None, view=None) == 7
    [message] = sent
    assert len(message["content"]) <= 2000 and message["content"].startswith("**Describe** - <@42>")
    assert message["content"].endswith("\\_…")  # never half an escape


# --- pure helpers ------------------------------------------------------------------------------


def test_the_token_is_used_until_shortly_before_discord_drops_it() -> None:
    fresh = Job(application_id=1, interaction_token="t", created_at=utcnow())
    assert token_alive(fresh)
    late = Job(
        application_id=1, interaction_token="t", created_at=utcnow() - TOKEN_LIFETIME + timedelta(seconds=10)
    )
    assert not token_alive(late)  # inside the margin: go to the channel instead
    assert not token_alive(Job(application_id=None, interaction_token="t", created_at=utcnow()))


def test_attachments_are_reencoded_only_when_too_large() -> None:
    data = png_bytes(256, 256, noise=True)
    assert fit(data, len(data), "png") == (data, "png")  # fits: the stored bytes go out as they are
    smaller, ext = fit(data, len(data) // 4, "png")
    assert len(smaller) <= len(data) // 4 and ext in ("jpg", "webp", "png")


def test_a_preview_is_a_small_jpeg_or_nothing() -> None:
    preview = preview_jpeg(base64.b64encode(png_bytes(600, 400)).decode(), 100_000)
    assert preview is not None and image_of(preview).size == (256, 171)
    assert preview_jpeg("not base64!", 100_000) is None
    assert preview_jpeg(base64.b64encode(png_bytes(600, 400, noise=True)).decode(), 10) is None
