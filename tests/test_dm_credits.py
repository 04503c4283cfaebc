"""/imagine in DMs (``ALLOW_DMS``) shares the member's guild allowance (bot.access.account_guild).

A DM job is charged to the member's account in the guild of their most recent guild job; a
member who never used the bot in a guild pays from a DM-only account (guild 0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from bot.models import Favourite, Member
from tests.botutil import (
    EPHEMERAL,
    FakeDispatcher,
    Harness,
    bot_harness,
    credits_used,
    finish_grid,
    has_result,
    press_and_wait,
    reply_of,
)

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def h(tmp_path: Path, sqlite_url: str) -> Any:
    """A bot that accepts DMs, with a 2-credit allowance."""
    async with bot_harness(tmp_path, sqlite_url, FakeDispatcher(), allow_dms=True, credit_limit=2) as harness:
        yield harness


async def members(h: Harness) -> list[tuple[int, int]]:
    async with h.sessions() as session:
        rows = (await session.scalars(select(Member).where(Member.user_id == h.fake.user.id))).all()
        return sorted((m.guild_id, m.credits_used) for m in rows)


async def test_dm_and_guild_jobs_draw_on_the_same_credits(h: Harness) -> None:
    guild_job, _ = await finish_grid(h, "a harbour")
    inter = await h.imagine("a lighthouse", dm=True)
    dm_job = await h.job_for(inter)
    assert dm_job.guild_id == 0 and dm_job.member_id == guild_job.member_id
    assert await members(h) == [(h.fake.guild.id, 2)]
    # The allowance is spent: the next DM job is refused, nothing charged.
    refused = await h.imagine("a ship", dm=True)
    answer = await reply_of(h, refused)
    assert "You have 0 credits left" in answer["content"]
    assert await h.job_count() == 2 and await credits_used(h, h.fake.user.id) == 2


async def test_a_member_new_to_guilds_pays_from_a_dm_account(h: Harness) -> None:
    inter = await h.imagine("a lighthouse", dm=True)
    job = await h.job_for(inter)
    assert job.guild_id == 0
    assert await members(h) == [(0, 1)]


async def test_info_in_a_dm_shows_the_shared_account(h: Harness) -> None:
    await finish_grid(h, "a harbour")
    inter = await h.fake.slash("info", dm=True)
    answer = await reply_of(h, inter)
    assert "Credits: **1** left (1 of 2 used" in answer["content"]


async def test_preferences_set_in_a_dm_apply_to_the_shared_account(h: Harness) -> None:
    await finish_grid(h, "a harbour")
    set_suffix = await h.fake.slash("prefer", {"value": "--seed 77"}, subcommand="suffix", dm=True)
    assert "--seed 77" in (await set_suffix.callback()).message_payload["content"]
    job = await h.job_for(await h.imagine("a lighthouse", dm=True))
    assert job.seed == 77


async def test_a_favourite_in_a_dm_belongs_to_the_shared_account(h: Harness) -> None:
    guild_job, _ = await finish_grid(h, "a harbour")
    grid, message = await finish_grid(h, "a lighthouse", dm=True)
    press, _ = await press_and_wait(h, f"mj:u:{grid.id}:1", message)  # ❤️ sits under one image
    crop_message = await press.wait_original(has_result)
    crop = await h.job_for(press)
    _press, answer = await press_and_wait(h, f"mj:fav:{crop.id}", crop_message)
    assert answer.message_payload["flags"] & EPHEMERAL
    async with h.sessions() as session:
        [favourite] = (await session.scalars(select(Favourite))).all()
    assert favourite.job_id == crop.id and favourite.member_id == guild_job.member_id
    assert [guild for guild, _used in await members(h)] == [h.fake.guild.id]  # no DM-only account
