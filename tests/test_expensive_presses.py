"""Expensive button presses ask Yes / No first (bot.flow + bot.confirm), on the fake Discord.

An upscale priced at ``PRICE_CONFIRM_AT`` credits or more asks privately; No charges nothing,
Yes starts the same follow-up job through the normal accept path and charges it once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bot.confirm import CANCELLED
from tests.botutil import (
    EPHEMERAL,
    FakeDispatcher,
    Harness,
    bot_harness,
    credits_used,
    finish_grid,
    has_result,
    press_and_wait,
    styles,
)
from workers.schema import JobKind

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def h(tmp_path: Path, sqlite_url: str) -> Any:
    """A bot whose upscales cost 4 credits (the default PRICE_CONFIRM_AT); grids cost 1."""
    async with bot_harness(tmp_path, sqlite_url, FakeDispatcher(), cost_upscale=4) as harness:
        yield harness


async def ask_upscale(h: Harness) -> tuple[str, dict[str, Any]]:
    """A finished crop, then its Upscale pressed: the crop's id and the private question."""
    crop_id, question, _crop_message = await ask_upscale_on(h)
    return crop_id, question


async def ask_upscale_on(h: Harness) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """As :func:`ask_upscale`, with the crop's message the Upscale button is on."""
    job, grid = await finish_grid(h, "a harbour --seed 7")
    press, _ = await press_and_wait(h, f"mj:u:{job.id}:1", grid)
    crop_message = await press.wait_original(has_result)
    crop = await h.job_for(press)
    press, _ = await press_and_wait(h, f"mj:up:{crop.id}:subtle", crop_message)
    question = await press.wait_original()
    return crop.id, question, crop_message


def answer_id(message: dict[str, Any], answer: str) -> str:
    ids = [c["custom_id"] for row in message["components"] for c in row["components"]]
    [found] = [cid for cid in ids if cid.startswith("mj:confirm:") and cid.endswith(f":{answer}")]
    return found


async def test_an_expensive_press_asks_and_no_charges_nothing(h: Harness) -> None:
    _crop, question = await ask_upscale(h)
    assert question["flags"] & EPHEMERAL and "costs 4 credits" in question["content"]
    assert await h.job_count() == 2 and await credits_used(h, h.fake.user.id) == 1
    _press, callback = await press_and_wait(h, answer_id(question, "no"), question)
    assert callback.message_payload["content"] == CANCELLED
    assert await h.job_count() == 2 and await credits_used(h, h.fake.user.id) == 1


async def test_yes_starts_the_same_upscale_charged_once(h: Harness) -> None:
    crop_id, question = await ask_upscale(h)
    press, _ = await press_and_wait(h, answer_id(question, "yes"), question)
    upscale = await h.job_for(press)
    assert upscale.kind == JobKind.UPSCALE.value and upscale.parent_id == crop_id
    assert upscale.cost == 4 and upscale.params["strength"] == 0.35 and upscale.params["scale"] == 2.0
    await h.dispatcher.wait_sent(2)
    assert await credits_used(h, h.fake.user.id) == 5
    await press_and_wait(h, answer_id(question, "yes"), question)
    assert await h.job_count() == 3


async def test_no_leaves_the_pressed_button_as_it_was(h: Harness) -> None:
    _crop_id, question, _crop_message = await ask_upscale_on(h)
    edits = len(h.fake.find_requests(route="channel_message_edit"))
    await press_and_wait(h, answer_id(question, "no"), question)
    assert len(h.fake.find_requests(route="channel_message_edit")) == edits


async def test_yes_turns_the_pressed_button_blue(h: Harness) -> None:
    crop_id, question, crop_message = await ask_upscale_on(h)
    button = f"mj:up:{crop_id}:subtle"
    assert styles(crop_message)[button] == 2  # the question alone changes nothing
    press, _ = await press_and_wait(h, answer_id(question, "yes"), question)
    await h.job_for(press)
    marked = await h.fake.wait_for_message(
        lambda m: m["id"] == crop_message["id"] and styles(m).get(button) == 1
    )
    assert styles(marked) == {**styles(crop_message), button: 1}
    assert marked["attachments"] == crop_message["attachments"]


async def test_a_cheap_press_does_not_ask(h: Harness) -> None:
    job, grid = await finish_grid(h, "a harbour --seed 7")
    press, callback = await press_and_wait(h, f"mj:v:{job.id}:1", grid)
    assert callback.callback_type == 5
    assert (await h.job_for(press)).kind == JobKind.VARIATION.value
