"""Results the workers' image classifier flagged: blocked and refunded, spoilered, or posted.

Through the fake Discord and the fake dispatcher: the worker's verdicts ride on its result
(``JobResult.safety``), the channel's age restriction is the one the job was accepted in, and a
U# crop is judged by its own tile's verdict.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot.content_rules import (
    CHANNEL_NSFW_KEY,
    SAFETY_KEY,
    SafetyPolicy,
    job_verdicts,
)
from bot.failure_messages import BLOCKED_MESSAGE
from bot.models import Job, JobStatus
from tests.botutil import FakeDispatcher, Harness, bot_harness, credits_used, has_result
from tests.fakes import FakeInteraction
from workers.schema import ErrorCode, SafetyVerdict

pytestmark = pytest.mark.timeout(60)

SAFE = SafetyVerdict(label="normal", score=0.02, unsafe=False)
FLAGGED = SafetyVerdict(label="nsfw", score=0.97, unsafe=True)


@pytest.fixture
async def harness(tmp_path: Path, sqlite_url: str, request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    """A bot with the safety settings a test passes (indirect parametrization), and an NSFW channel."""
    settings: dict[str, Any] = getattr(request, "param", {})
    async with bot_harness(tmp_path, sqlite_url, FakeDispatcher(), start=False, **settings) as h:
        nsfw = h.fake.add_channel(h.fake.guild, "after-dark")
        nsfw.nsfw = True
        h.nsfw_channel = nsfw  # type: ignore[attr-defined]
        await h.start_bot()
        yield h


async def run_grid(
    h: Harness, prompt: str, verdicts: list[SafetyVerdict], **slash: Any
) -> tuple[FakeInteraction, Job]:
    """``/imagine`` whose worker result carries ``verdicts``; returns once the job is final."""
    inter = await h.fake.slash("imagine", {"prompt": prompt}, **slash)
    job = await h.job_for(inter)
    await h.wait_job(job.id, lambda j: j.status == JobStatus.QUEUED)
    h.dispatcher.succeed(job.id)
    h.dispatcher.state[job.id].info["result"]["safety"] = [v.model_dump(mode="json") for v in verdicts]
    assert h.bot is not None
    h.bot.tracker.wake()
    return inter, await h.wait_job(job.id, lambda j: j.delivered and JobStatus(j.status).is_final)


@pytest.mark.parametrize("harness", [{"safety_action": "block"}], indirect=True)
async def test_a_flagged_grid_is_blocked_refunded_and_explained(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="bot.delivery"):
        inter, job = await run_grid(harness, "a storm at sea", [SAFE, FLAGGED, SAFE, SAFE])
        # Inside: "delivered" is the claim, the end is logged just after it, before the send.
        message = await inter.wait_original(lambda m: "❌" in (m.get("content") or ""))
    assert job.status == JobStatus.FAILED and job.error_code == ErrorCode.BLOCKED
    assert "nsfw" in (job.error or "")  # the label is kept for the logs
    assert BLOCKED_MESSAGE in message["content"] and "Your 1 credit was refunded." in message["content"]
    assert "nsfw" not in message["content"]
    assert not message.get("attachments") and not message.get("components")
    assert await credits_used(harness, harness.fake.user.id) == 0
    # The job's end is logged once, at INFO, with the refund and the reason members do not see.
    [end] = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"job {job.id} failed")]
    assert "1 credit(s) refunded, blocked:" in end and "nsfw" in end and "waited" in end


@pytest.mark.parametrize("harness", [{"safety_action": "spoiler"}], indirect=True)
async def test_a_flagged_grid_is_sent_as_a_spoiler_and_charged(harness: Harness) -> None:
    inter, job = await run_grid(harness, "a storm at sea", [SAFE, FLAGGED, SAFE, SAFE])
    assert job.status == JobStatus.DONE
    message = await inter.wait_original(has_result)
    assert message["attachments"][0]["filename"].startswith("SPOILER_")
    assert [v.unsafe for v in job_verdicts(job.params)] == [False, True, False, False]
    assert await credits_used(harness, harness.fake.user.id) == 1


@pytest.mark.parametrize("harness", [{"safety_action": "spoiler"}], indirect=True)
async def test_a_clean_grid_is_posted_as_it_is(harness: Harness) -> None:
    inter, job = await run_grid(harness, "a calm sea", [SAFE] * 4)
    message = await inter.wait_original(has_result)
    assert not message["attachments"][0]["filename"].startswith("SPOILER_")
    assert job.params[SAFETY_KEY] and not any(v.unsafe for v in job_verdicts(job.params))


@pytest.mark.parametrize(
    "harness", [{"safety_action": "block", "safety_allow_nsfw_channels": True}], indirect=True
)
async def test_an_age_restricted_channel_gets_flagged_results_as_they_are(harness: Harness) -> None:
    channel = harness.nsfw_channel  # type: ignore[attr-defined]
    inter, job = await run_grid(harness, "a storm at sea", [FLAGGED] * 4, channel=channel)
    assert job.status == JobStatus.DONE and job.params[CHANNEL_NSFW_KEY] is True
    message = await inter.wait_original(has_result)
    assert not message["attachments"][0]["filename"].startswith("SPOILER_")


@pytest.mark.parametrize(
    "harness", [{"safety_action": "block", "safety_allow_nsfw_channels": False}], indirect=True
)
async def test_an_age_restricted_channel_is_blocked_when_the_owner_says_so(harness: Harness) -> None:
    channel = harness.nsfw_channel  # type: ignore[attr-defined]
    _inter, job = await run_grid(harness, "a storm at sea", [FLAGGED] * 4, channel=channel)
    assert job.status == JobStatus.FAILED and job.error_code == ErrorCode.BLOCKED


@pytest.mark.parametrize("harness", [{"safety_action": "spoiler"}], indirect=True)
async def test_a_u_crop_is_judged_by_its_own_tile(harness: Harness) -> None:
    inter, job = await run_grid(harness, "a storm at sea", [SAFE, FLAGGED, SAFE, SAFE])
    message = await inter.wait_original(has_result)
    clean = await harness.fake.press(f"mj:u:{job.id}:1", message)
    clean_message = await clean.wait_original(has_result)
    assert not clean_message["attachments"][0]["filename"].startswith("SPOILER_")
    flagged = await harness.fake.press(f"mj:u:{job.id}:2", message)
    flagged_message = await flagged.wait_original(has_result)
    assert flagged_message["attachments"][0]["filename"].startswith("SPOILER_")
    crop = await harness.job_for(flagged)
    assert [v.label for v in job_verdicts((await harness.job(crop.id)).params)] == ["nsfw"]


@pytest.mark.parametrize("harness", [{"safety_action": "spoiler"}], indirect=True)
async def test_a_u_crop_of_a_flagged_tile_is_blocked_under_a_blocking_policy(harness: Harness) -> None:
    inter, job = await run_grid(harness, "a storm at sea", [SAFE, FLAGGED, SAFE, SAFE])
    message = await inter.wait_original(has_result)
    assert harness.bot is not None
    # The owner switches to blocking after the grid went out (the policy is read per decision).
    harness.bot.tracker.safety_policy = SafetyPolicy(action="block", allow_nsfw_channels=True)
    flagged = await harness.fake.press(f"mj:u:{job.id}:2", message)
    crop = await harness.wait_job((await harness.job_for(flagged)).id, lambda j: j.delivered)
    assert crop.status == JobStatus.FAILED and crop.error_code == ErrorCode.BLOCKED
    clean = await harness.fake.press(f"mj:u:{job.id}:3", message)
    await clean.wait_original(has_result)
