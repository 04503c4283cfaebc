"""The job service through the bot: fairness caps, release to the broker, dispatch after restarts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bot.models import JobStatus
from tests.botutil import (
    EPHEMERAL,
    FakeDispatcher,
    Harness,
    bot_harness,
    credits_used,
)

pytestmark = pytest.mark.timeout(60)


async def test_fairness_caps_running_and_waiting(tmp_path: Path, db_url: str) -> None:
    dispatcher = FakeDispatcher()
    async with bot_harness(
        tmp_path, db_url, dispatcher, max_running_per_member=2, max_waiting_per_member=2
    ) as h:
        alice = h.fake.user
        bob = h.fake.add_member(h.fake.guild, "bob").user
        inters = [await h.imagine(f"prompt {i}", user=alice) for i in range(4)]
        # Interactions are handled concurrently; the queue order is the order they were accepted.
        jobs = sorted([await h.job_for(i) for i in inters], key=lambda j: (j.created_at, j.id))
        await dispatcher.wait_sent(2)
        for request in dispatcher.sent[:2]:  # marked queued just after the broker took them
            await h.wait_job(request.job_id, lambda j: j.status == JobStatus.QUEUED.value)
        refused = await h.imagine("one too many", user=alice)
        refusal = await h.fake.wait_for_request(
            lambda r: r.interaction_token == refused.token and r.route == "webhook_execute"
        )
        assert refusal.message_payload["flags"] & EPHEMERAL
        assert "2 job(s) running and 2 waiting" in refusal.message_payload["content"]
        assert await h.job_count() == 4
        assert await credits_used(h, alice.id) == 4  # the refused one was not charged

        # Bob is not stuck behind Alice's backlog: his job goes to the broker at once.
        bob_job = await h.job_for(await h.imagine("bob's turn", user=bob))
        await dispatcher.wait_sent(3)
        assert dispatcher.sent[2].job_id == bob_job.id
        assert [r.job_id for r in dispatcher.sent[:2]] == [jobs[0].id, jobs[1].id]
        statuses = [(await h.job(j.id)).status for j in jobs]
        assert statuses.count(JobStatus.WAITING) == 2

        # One of Alice's finishes: exactly one more of hers is released, the oldest.
        dispatcher.succeed(jobs[0].id)
        h.bot.tracker.wake()
        await dispatcher.wait_sent(4)
        assert dispatcher.sent[3].job_id == jobs[2].id
        await h.settle()  # several tracker passes: nothing else is released
        assert len(dispatcher.sent) == 4
        assert (await h.job(jobs[3].id)).status == JobStatus.WAITING


async def test_simultaneous_commands_never_exceed_the_caps(tmp_path: Path, db_url: str) -> None:
    dispatcher = FakeDispatcher()
    async with bot_harness(
        tmp_path, db_url, dispatcher, max_running_per_member=2, max_waiting_per_member=2
    ) as h:
        inters = await asyncio.gather(*(h.imagine(f"burst {i}") for i in range(8)))
        replies = await asyncio.gather(
            *(
                h.fake.wait_for_request(
                    lambda r, i=i: (
                        r.interaction_token == i.token
                        and r.route in ("webhook_execute", "webhook_message_edit")
                    )
                )
                for i in inters
            )
        )
        refused = [r for r in replies if r.route == "webhook_execute"]
        assert len(refused) == 4 and all("Nothing was charged" in r.json["content"] for r in refused)
        assert await h.job_count() == 4
        assert await credits_used(h, h.fake.user.id) == 4
        await dispatcher.wait_sent(2)
        await h.settle()  # later passes of the tracker release nothing more
        assert len(dispatcher.sent) == 2


async def test_broker_down_keeps_job_waiting_until_it_is_back(h: Harness) -> None:
    h.dispatcher.fail_sends = 3
    inter = await h.imagine("patience")
    job = await h.job_for(inter)
    await h.dispatcher.wait_sent(1, timeout=10)
    assert h.dispatcher.sent[0].job_id == job.id
    await h.wait_job(job.id, lambda j: j.status == JobStatus.QUEUED)


async def test_restart_dispatches_waiting_jobs(tmp_path: Path, sqlite_url: str) -> None:
    dispatcher = FakeDispatcher(fail_sends=1000)  # the broker is down: jobs stay waiting
    async with bot_harness(tmp_path, sqlite_url, dispatcher) as h:
        inter = await h.imagine("held")
        job = await h.job_for(inter)
        await h.settle()  # the tracker tried to release it, and the broker refused
        await h.stop_bot()
        assert (await h.job(job.id)).status == JobStatus.WAITING
        dispatcher.fail_sends = 0
        await h.start_bot()
        await dispatcher.wait_sent(1)
        await h.wait_job(job.id, lambda j: j.status == JobStatus.QUEUED)
