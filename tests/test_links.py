"""Web and ❤️ under results: a public job links to its gallery page; a stealth job's Web button
answers only its owner, privately, with a link signed for them; ❤️ toggles the presser's
favourite and says which way it went."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

from bot.buttons import NOT_YOURS
from bot.favourites import favourite_count
from bot.links import ADDED, REMOVED, WebButton, web_item
from bot.models import Job
from bot.signing import PURPOSE_JOB, Signer
from tests.botutil import (
    EPHEMERAL,
    FakeDispatcher,
    Harness,
    bot_harness,
    finish_grid,
    has_result,
    press_and_wait,
)

pytestmark = pytest.mark.timeout(60)
SECRET = "links-test-secret-0123456789abcdef"
JOB = "AbC_def-123456789012345"


def buttons(message: dict[str, Any]) -> list[dict[str, Any]]:
    """Every button of a message, row by row."""
    return [c for row in message.get("components") or [] for c in row.get("components") or []]


def test_web_is_a_link_for_public_jobs_and_a_button_for_stealth_ones() -> None:
    public = web_item(Job(id=JOB, visibility="public"), "https://gallery.example/", row=4)
    assert public.url == f"https://gallery.example/j/{JOB}" and public.custom_id is None  # type: ignore[attr-defined]
    stealth = web_item(Job(id=JOB, visibility="stealth"), "https://gallery.example", row=4)
    assert isinstance(stealth, WebButton) and stealth.item.custom_id == f"mj:web:{JOB}"
    assert stealth.item.url is None


def test_a_public_url_discord_could_not_open_gives_the_answering_button() -> None:
    item = web_item(Job(id=JOB, visibility="public"), "gallery.example", row=4)
    assert isinstance(item, WebButton)


@pytest.fixture
async def h(tmp_path: Path, sqlite_url: str) -> Any:
    """A bot over SQLite with a fake dispatcher and a known link secret."""
    async with bot_harness(tmp_path, sqlite_url, FakeDispatcher(), web_secret=SECRET) as harness:
        yield harness


async def test_public_results_link_to_their_page(h: Harness) -> None:
    job, message = await finish_grid(h, "a public harbour")
    [web] = [b for b in buttons(message) if b.get("label") == "Web"]
    assert web["style"] == 5 and web["url"] == f"http://gallery.test/j/{job.id}"
    assert "custom_id" not in web


async def test_stealth_web_answers_only_the_owner_with_a_link_for_them(h: Harness) -> None:
    job, message = await finish_grid(h, "a hidden cove --stealth")
    assert not any(b.get("url") for b in buttons(message))  # no link anyone could open

    mallory = h.fake.add_member(h.fake.guild, "mallory").user
    _, refused = await press_and_wait(h, f"mj:web:{job.id}", message, user=mallory)
    assert refused.callback_type == 4 and refused.message_payload["flags"] & EPHEMERAL
    assert refused.message_payload["content"] == NOT_YOURS

    _, answer = await press_and_wait(h, f"mj:web:{job.id}", message)
    payload = answer.message_payload
    assert answer.callback_type == 4 and payload["flags"] & EPHEMERAL
    [link] = buttons(payload)
    assert link["url"].startswith("http://gallery.test/p/") and link["url"] in payload["content"]
    claims = Signer(SECRET.encode()).verify(unquote(link["url"].rsplit("/", 1)[1]), PURPOSE_JOB)
    assert claims.user_id == h.fake.user.id and claims.job_id == job.id


async def single_image(h: Harness, prompt: str) -> tuple[Job, dict[str, Any]]:
    """A grid, then U1: the single image and its message."""
    grid, message = await finish_grid(h, prompt)
    press, _ = await press_and_wait(h, f"mj:u:{grid.id}:1", message)
    result = await press.wait_original(has_result)
    return await h.job_for(press), result


async def test_favourite_toggles_for_the_presser(h: Harness) -> None:
    job, message = await single_image(h, "a lovely fox")
    [heart] = [b for b in buttons(message) if (b.get("emoji") or {}).get("name") == "❤️"]
    assert heart["custom_id"] == f"mj:fav:{job.id}"

    _, added = await press_and_wait(h, f"mj:fav:{job.id}", message)
    assert added.message_payload["content"] == ADDED and added.message_payload["flags"] & EPHEMERAL
    bob = h.fake.add_member(h.fake.guild, "bob").user
    _, by_bob = await press_and_wait(h, f"mj:fav:{job.id}", message, user=bob)
    assert by_bob.message_payload["content"] == ADDED
    async with h.sessions() as session:
        assert await favourite_count(session, job.id) == 2

    _, removed = await press_and_wait(h, f"mj:fav:{job.id}", message)
    assert removed.message_payload["content"] == REMOVED
    async with h.sessions() as session:
        assert await favourite_count(session, job.id) == 1  # bob's stays


async def test_nobody_else_can_favourite_a_stealth_image(h: Harness) -> None:
    job, message = await single_image(h, "a private fox --stealth")
    mallory = h.fake.add_member(h.fake.guild, "mallory").user
    _, refused = await press_and_wait(h, f"mj:fav:{job.id}", message, user=mallory)
    assert refused.message_payload["content"] == NOT_YOURS
    async with h.sessions() as session:
        assert await favourite_count(session, job.id) == 0
