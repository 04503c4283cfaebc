"""Yes / No confirmations (bot/confirm.py) through /imagine, against the fake Discord."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update

from bot.confirm import CANCELLED, EXPIRED, NOT_YOURS
from bot.models import Job, PendingConfirmation, utcnow
from tests.botutil import EPHEMERAL, FakeDispatcher, Harness, bot_harness, credits_used, has_result

pytestmark = pytest.mark.timeout(90)


async def ask(h: Harness, prompt: str) -> dict[str, Any]:
    """Run /imagine and return the private question it was answered with."""
    inter = await h.imagine(prompt)
    request = await h.fake.wait_for_request(
        lambda r: (
            r.interaction_token == inter.token and r.route in ("webhook_execute", "webhook_message_edit")
        )
    )
    message = request.response
    assert isinstance(message, dict) and message["flags"] & EPHEMERAL
    return message


def answer_id(message: dict[str, Any], answer: str) -> str:
    """The custom_id of the Yes or No button."""
    ids = [c["custom_id"] for row in message["components"] for c in row["components"]]
    [found] = [cid for cid in ids if cid.endswith(f":{answer}")]
    return found


async def pending_count(h: Harness) -> int:
    async with h.sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(PendingConfirmation)) or 0)


async def test_no_cancels_with_nothing_charged(h: Harness) -> None:
    message = await ask(h, "a {red, blue} fox")
    assert message["content"].startswith("This makes 2 jobs and costs 2 credits.")
    press = await h.fake.press(answer_id(message, "no"), message)
    callback = await press.callback()
    assert callback.callback_type == 7 and callback.message_payload["content"] == CANCELLED
    assert await h.job_count() == 0 and await credits_used(h, h.fake.user.id) == 0
    assert await pending_count(h) == 0


async def test_only_the_asked_member_may_answer(h: Harness) -> None:
    message = await ask(h, "a {red, blue} fox")
    mallory = h.fake.add_member(h.fake.guild, "mallory").user
    press = await h.fake.press(answer_id(message, "yes"), message, user=mallory)
    callback = await press.callback()
    assert callback.message_payload["content"] == NOT_YOURS and callback.message_payload["flags"] & EPHEMERAL
    assert await h.job_count() == 0 and await pending_count(h) == 1


async def test_an_expired_question_starts_nothing(h: Harness) -> None:
    message = await ask(h, "a fox --repeat 2")
    async with h.sessions() as session, session.begin():
        await session.execute(update(PendingConfirmation).values(expires_at=utcnow() - timedelta(seconds=1)))
    press = await h.fake.press(answer_id(message, "yes"), message)
    assert (await press.callback()).message_payload["content"] == EXPIRED
    assert await h.job_count() == 0 and await credits_used(h, h.fake.user.id) == 0


async def test_yes_after_a_restart_starts_every_job_once(h: Harness) -> None:
    message = await ask(h, "a {red, blue, green} fox")
    await h.restart_bot()
    press = await h.fake.press(answer_id(message, "yes"), message)
    await h.dispatcher.wait_sent(3, timeout=15)
    async with h.sessions() as session:
        prompts = sorted((await session.scalars(select(Job.prompt))).all())
    assert prompts == ["a blue fox", "a green fox", "a red fox"]
    assert await credits_used(h, h.fake.user.id) == 3
    # The first job shows in the press's message; a second press finds the question answered.
    first = await press.wait_original(lambda m: "Waiting to start" in (m.get("content") or ""))
    assert first["content"].startswith("**a red fox --seed ")
    again = await h.fake.press(answer_id(message, "yes"), message)
    assert (await again.callback()).message_payload["content"] == EXPIRED
    assert await h.job_count() == 3


async def test_every_job_of_a_confirmed_batch_shows_in_a_message_of_its_own(h: Harness) -> None:
    message = await ask(h, "a {red, blue, green} fox")
    press = await h.fake.press(answer_id(message, "yes"), message)
    await h.dispatcher.wait_sent(3, timeout=15)
    async with h.sessions() as session:
        jobs = {job.prompt: job for job in (await session.scalars(select(Job))).all()}
    red, blue, green = jobs["a red fox"], jobs["a blue fox"], jobs["a green fox"]
    # The first job is the press's own response; the others each have a follow-up message.
    assert red.reply_message_id is None
    assert blue.reply_message_id and green.reply_message_id
    assert blue.reply_message_id != green.reply_message_id

    def own(job: Job, text: str) -> Any:
        return lambda m: int(m["id"]) == job.reply_message_id and text in (m.get("content") or "")

    await h.fake.wait_for_message(own(blue, "Waiting to start"))
    h.dispatcher.start(blue.id, 40)
    await h.fake.wait_for_message(own(blue, "(40%)"))
    h.dispatcher.succeed(blue.id)
    result = await h.fake.wait_for_message(
        lambda m: int(m["id"]) == blue.reply_message_id and has_result(m), timeout=15
    )
    assert result["content"].startswith("**a blue fox --seed ")
    delivered = await h.wait_job(blue.id, lambda j: j.message_id is not None)
    assert delivered.message_id == blue.reply_message_id
    assert not h.fake.find_requests(route="channel_message_create")  # nothing went to the channel
    first = await press.wait_original(lambda m: "Waiting to start" in (m.get("content") or ""))
    assert first["content"].startswith("**a red fox --seed ")


async def test_a_job_refused_for_credits_stops_the_rest_with_a_clear_message(
    tmp_path: Path, sqlite_url: str
) -> None:
    async with bot_harness(tmp_path, sqlite_url, FakeDispatcher(), credit_limit=2) as h:
        message = await ask(h, "a {red, blue, green} fox")
        press = await h.fake.press(answer_id(message, "yes"), message)
        request = await h.fake.wait_for_request(
            lambda r: (
                r.interaction_token == press.token
                and r.route == "webhook_execute"
                and "Started 2 of 3 jobs" in (r.message_payload.get("content") or "")
            )
        )
        said = request.message_payload
        assert said["flags"] & EPHEMERAL
        assert "the other 1 were not started and nothing was charged for them" in said["content"]
        assert "You have 0 credits left" in said["content"]
        assert await h.job_count() == 2 and await credits_used(h, h.fake.user.id) == 2


async def test_expired_questions_are_purged_when_the_next_is_asked(h: Harness) -> None:
    await ask(h, "a {red, blue} fox")
    async with h.sessions() as session, session.begin():
        await session.execute(update(PendingConfirmation).values(expires_at=utcnow() - timedelta(seconds=1)))
    await ask(h, "a {big, small} fox")
    assert await pending_count(h) == 1
