"""The owners' /mirage command and the guild gate at /imagine, through the fake Discord."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from bot.access import DMS_REFUSED, GUILD_NOT_APPROVED, MEMBER_BANNED
from bot.cogs.owner import NOT_OWNER
from bot.models import Guild, Job
from tests.botutil import EPHEMERAL, FakeDispatcher, Harness, bot_harness, reply_of

pytestmark = pytest.mark.timeout(60)

OTHER_GUILD = 987654321012345678


@pytest.fixture
async def h(tmp_path: Path, sqlite_url: str) -> Any:
    """A bot that serves only a guild it does not know yet; the fake user is its owner."""
    async with bot_harness(tmp_path, sqlite_url, FakeDispatcher(), start=False) as harness:
        harness.settings.allowed_guild_ids = [OTHER_GUILD]
        harness.settings.owner_user_ids = [harness.fake.user.id]
        await harness.start_bot()
        yield harness


async def answer(inter: Any) -> str:
    """The private answer of an owner command (answered at once, not deferred)."""
    callback = await inter.callback()
    assert callback.message_payload["flags"] & EPHEMERAL
    return str(callback.message_payload["content"])


async def job_count(h: Harness) -> int:
    async with h.sessions() as session:
        return len((await session.scalars(select(Job.id))).all())


async def test_an_unapproved_guild_starts_nothing_until_an_owner_approves_it(h: Harness) -> None:
    inter = await h.imagine("not here")
    assert GUILD_NOT_APPROVED in (await reply_of(h, inter))["content"]
    assert await job_count(h) == 0
    approve = await h.fake.slash("mirage", {"guild_id": str(h.fake.guild.id)}, subcommand="guild approve")
    assert "approved" in (await answer(approve))
    await h.job_for(await h.imagine("now it works"))
    assert await job_count(h) == 1


async def test_mirage_is_for_owners_only(h: Harness) -> None:
    stranger = h.fake.add_member(h.fake.guild, "stranger")
    inter = await h.fake.slash(
        "mirage", {"guild_id": str(h.fake.guild.id)}, subcommand="guild approve", user=stranger
    )
    callback = await inter.callback()
    assert callback.message_payload["flags"] & EPHEMERAL
    assert callback.message_payload["content"] == NOT_OWNER
    async with h.sessions() as session:
        row = await session.get(Guild, h.fake.guild.id)
    assert row is None or not row.approved


async def test_a_banned_member_is_refused(h: Harness) -> None:
    approve = await h.fake.slash("mirage", {"guild_id": str(h.fake.guild.id)}, subcommand="guild approve")
    await answer(approve)
    bad = h.fake.add_member(h.fake.guild, "bad")
    ban = await h.fake.slash("mirage", {"user": bad.user}, subcommand="member ban")
    assert "banned everywhere" in (await answer(ban))
    inter = await h.imagine("let me in", user=bad)
    assert MEMBER_BANNED in (await reply_of(h, inter))["content"]
    assert await job_count(h) == 0


async def test_imagine_in_dms_is_refused_by_default(h: Harness) -> None:
    inter = await h.imagine("in private", dm=True)
    assert DMS_REFUSED in (await reply_of(h, inter))["content"]
    assert await job_count(h) == 0


async def test_a_server_id_that_is_not_one_gets_a_clear_answer(h: Harness) -> None:
    for bad in ("abc", "-5", "0", "1" * 30):
        for sub, options in (
            ("guild approve", {"guild_id": bad}),
            ("member ban", {"user": h.fake.user, "guild_id": bad}),
        ):
            text = await answer(await h.fake.slash("mirage", options, subcommand=sub))
            assert "guild_id" in text and "numeric" in text and "Nothing changed" in text
    async with h.sessions() as session:
        assert [g.id for g in (await session.scalars(select(Guild))).all() if g.approved] == []
