"""The S3 media store down while results arrive and while members press buttons.

The bot stores every image in an S3-compatible bucket through the real boto3 client, pointed at a
fake S3 server on 127.0.0.1 (``tests/fakes/s3_server.py``) that can answer everything with
``503 ServiceUnavailable``. Nothing may be lost or charged twice:

- a result that arrives during a short outage is stored and delivered once S3 is back (the
  tracker's paced retries), charged once;
- an outage that outlasts the retries ends the job with a message and exactly one refund;
- a button that needs a stored image (U# crop, V#) pressed during the outage gets an answer and
  costs nothing it did not deliver; once S3 is back the same press works.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

import bot.tracker
from bot.models import CreditEntry, JobStatus
from bot.storage import S3MediaStore, make_store
from tests.botutil import (
    FakeDispatcher,
    Harness,
    bot_harness,
    credits_used,
    has_result,
    press_and_wait,
    result_message_ids,
)
from tests.fakes.s3_server import FakeS3Server

pytest.importorskip("boto3")
pytestmark = [pytest.mark.reliability, pytest.mark.timeout(180)]

# Short pauses between store attempts (production: 1, 2, 4, 8 s); the count is what is tested.
RETRY_DELAYS_S = (0.1, 0.2, 0.4, 0.8)


@contextlib.asynccontextmanager
async def s3_bot(tmp_path: Path, sqlite_url: str) -> AsyncIterator[tuple[Harness, FakeS3Server]]:
    """A bot whose media store is the fake S3 bucket (real boto3), with fast store retries."""
    async with FakeS3Server() as s3:
        settings = {
            "media_backend": "s3",
            "s3_bucket": "mirage",
            "s3_endpoint_url": s3.endpoint_url,
            "s3_region": "us-east-1",
            "s3_access_key": "test-access-key",
            "s3_secret_key": "test-secret-key",
            "s3_prefix": "media",
        }
        async with bot_harness(tmp_path, sqlite_url, FakeDispatcher(), start=False, **settings) as h:
            h.store = make_store(h.settings)  # type: ignore[assignment]
            assert isinstance(h.store, S3MediaStore)
            await h.start_bot()
            assert h.bot is not None
            h.bot.tracker.store_retries.delays = RETRY_DELAYS_S
            yield h, s3


async def charges(h: Harness, job_id: str) -> list[str]:
    async with h.sessions() as session:
        rows = await session.scalars(select(CreditEntry.kind).where(CreditEntry.job_id == job_id))
        return list(rows.all())


async def queued_job(h: Harness, prompt: str) -> tuple[Any, Any]:
    inter = await h.imagine(prompt)
    job = await h.job_for(inter)
    await h.wait_job(job.id, lambda j: j.status == JobStatus.QUEUED)
    return inter, job


async def finished_during_outage(h: Harness, s3: FakeS3Server, prompt: str) -> tuple[Any, Any]:
    """A job whose worker finishes while S3 answers 503."""
    inter, job = await queued_job(h, prompt)
    s3.outage()
    h.dispatcher.succeed(job.id)
    h.bot.tracker.wake()  # type: ignore[union-attr]
    return inter, job


async def delivered_grid(h: Harness, prompt: str) -> tuple[Any, dict[str, Any], int]:
    """A grid delivered while S3 works: its job, message, and the member's credits used so far."""
    inter, job = await queued_job(h, prompt)
    h.dispatcher.succeed(job.id)
    grid = await inter.wait_original(has_result, timeout=30)
    await h.wait_job(job.id, lambda j: j.message_id is not None)
    return job, grid, await credits_used(h, h.fake.user.id)


async def test_a_result_during_a_short_outage_is_delivered_once_s3_is_back(
    tmp_path: Path, sqlite_url: str
) -> None:
    async with s3_bot(tmp_path, sqlite_url) as (h, s3):
        inter, job = await finished_during_outage(h, s3, "a harbour at night")
        # The bot has tried to store it and met the outage, and keeps the job (not failed).
        async with asyncio.timeout(30):
            while not any(method == "PUT" for method, _ in s3.requests):  # noqa: ASYNC110 - another server
                await asyncio.sleep(0.02)
        assert (await h.job(job.id)).status != JobStatus.FAILED.value
        s3.restore()
        message = await inter.wait_original(has_result, timeout=30)
        done = await h.wait_job(job.id, lambda j: j.message_id is not None)
        assert done.status == JobStatus.DONE.value and done.delivered
        assert await charges(h, job.id) == ["reserve"]
        assert len(result_message_ids(h, inter, job.id)) == 1
        assert any(key.startswith(f"media/jobs/{job.id}/0.") for key in s3.objects())
        assert message["attachments"]


async def test_an_outage_that_outlasts_the_retries_refunds_once_with_a_message(
    tmp_path: Path, sqlite_url: str
) -> None:
    async with s3_bot(tmp_path, sqlite_url) as (h, s3):
        inter, job = await finished_during_outage(h, s3, "nowhere to keep it")
        message = await inter.wait_original(lambda m: "❌" in (m.get("content") or ""), timeout=60)
        assert "refunded" in message["content"]
        failed = await h.wait_job(job.id, lambda j: j.status == JobStatus.FAILED.value)
        assert failed.error == bot.tracker.STORE_FAILED
        await h.settle(ticks=5)
        assert sorted(await charges(h, job.id)) == ["refund", "reserve"]
        assert await credits_used(h, h.fake.user.id) == 0
        puts = [path for method, path in s3.requests if method == "PUT"]
        # The first try and one per pause, each a few boto3 attempts; then no more: no hot loop.
        assert 1 + len(RETRY_DELAYS_S) <= len(puts) <= (1 + len(RETRY_DELAYS_S)) * 5


async def test_buttons_pressed_during_an_outage_answer_and_charge_nothing_undelivered(
    tmp_path: Path, sqlite_url: str
) -> None:
    async with s3_bot(tmp_path, sqlite_url) as (h, s3):
        job, grid, used = await delivered_grid(h, "a lighthouse")

        s3.outage()
        press, _ = await press_and_wait(h, f"mj:u:{job.id}:1", grid)
        # The member is told something, never left with "thinking…".
        answer = await press.wait_original(lambda m: bool(m.get("content")), timeout=30)
        print("U1 during the outage:", answer["content"])
        s3.restore()
        press, _ = await press_and_wait(h, f"mj:u:{job.id}:1", grid)
        crop = await press.wait_original(has_result, timeout=30)
        assert crop["attachments"]
        assert await credits_used(h, h.fake.user.id) == used  # a crop is free, failed or not


async def test_a_variation_pressed_during_an_outage_waits_for_its_input_then_runs(
    tmp_path: Path, sqlite_url: str
) -> None:
    async with s3_bot(tmp_path, sqlite_url) as (h, s3):
        job, grid, _ = await delivered_grid(h, "a lighthouse")
        sent = len(h.dispatcher.sent)

        s3.outage()  # V1 needs the grid's image from the store to build its worker message
        press, _ = await press_and_wait(h, f"mj:v:{job.id}:1", grid)
        waiting = await press.wait_original(lambda m: "Waiting to start" in (m.get("content") or ""))
        variation = await h.job_for(press)
        await h.settle(ticks=5)  # release sweeps meet the outage: the job waits, nothing fails
        assert (await h.job(variation.id)).status == JobStatus.WAITING.value
        assert len(h.dispatcher.sent) == sent and "❌" not in waiting["content"]

        s3.restore()
        await h.wait_job(variation.id, lambda j: j.status == JobStatus.QUEUED.value, timeout=30)
        await h.dispatcher.wait_sent(sent + 1)
        assert h.dispatcher.request(variation.id).input_image is not None
        assert await charges(h, variation.id) == ["reserve"]
