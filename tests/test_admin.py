"""Admin commands: ``/quota`` and ``/status``, and who may use them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from bot.models import Guild, JobStatus, Member
from tests.botutil import (
    EPHEMERAL,
    FakeDispatcher,
    Harness,
    bot_harness,
    reply_of,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def h(tmp_path: Path, sqlite_url: str) -> Any:
    """A bot over SQLite with a fake dispatcher, serving the fake guild (listed by its owner)."""
    async with bot_harness(tmp_path, sqlite_url, FakeDispatcher(), start=False) as harness:
        harness.settings.allowed_guild_ids = [harness.fake.guild.id]
        await harness.start_bot()
        yield harness


@pytest.fixture
async def open_bot(tmp_path: Path, sqlite_url: str) -> Any:
    """A bot that serves any guild (ALLOWED_GUILD_IDS empty), as after a fresh invite."""
    async with bot_harness(tmp_path, sqlite_url, FakeDispatcher()) as harness:
        yield harness


async def test_manage_server_in_a_guild_nobody_approved_gives_no_credits_power(open_bot: Harness) -> None:
    h = open_bot
    admin_role = h.fake.add_role(h.fake.guild, "mods", permissions=1 << 5)  # MANAGE_GUILD
    admin = h.fake.add_member(h.fake.guild, "inviter", roles=[admin_role])
    inter = await h.fake.slash("quota", {"user": admin.user, "amount": 1000}, subcommand="grant", user=admin)
    callback = await inter.callback()
    assert callback.message_payload["flags"] & EPHEMERAL
    assert "approved" in callback.message_payload["content"]
    async with h.sessions() as session, session.begin():
        session.add(Guild(id=h.fake.guild.id, name="", approved=True))  # what /mirage guild approve does
    inter = await h.fake.slash("quota", {"user": admin.user, "amount": 2}, subcommand="grant", user=admin)
    assert "Granted 2" in (await reply_of(h, inter))["content"]


async def test_non_admin_is_refused_quota_and_status(h: Harness) -> None:
    bob = h.fake.add_member(h.fake.guild, "bob")
    for name, options, sub in (
        ("quota", {"user": bob.user, "limit": 100}, "set"),
        ("quota", {"user": bob.user}, "show"),
        ("quota", {"limit": 5}, "default"),
        ("status", None, None),
    ):
        inter = await h.fake.slash(name, options, subcommand=sub, user=bob)
        callback = await inter.callback()
        assert callback.callback_type == 4
        assert callback.message_payload["flags"] & EPHEMERAL
        assert "Manage Server" in callback.message_payload["content"]
    async with h.sessions() as session:
        member = (await session.scalars(select(Member).where(Member.user_id == bob.user.id))).first()
    assert member is None or member.credit_limit is None


async def test_admin_manages_quotas(h: Harness) -> None:
    admin_role = h.fake.add_role(h.fake.guild, "mods", permissions=1 << 5)  # MANAGE_GUILD
    admin = h.fake.add_member(h.fake.guild, "modsy", roles=[admin_role])
    alice = h.fake.user

    inter = await h.fake.slash(
        "quota", {"user": alice, "limit": 3, "period": "week"}, subcommand="set", user=admin
    )
    assert "3 credits left: 0 of 3 used this week" in (await reply_of(h, inter))["content"]
    inter = await h.fake.slash("quota", {"user": alice, "amount": 2}, subcommand="grant", user=admin)
    assert "5 credits left" in (await reply_of(h, inter))["content"]
    await h.job_for(await h.imagine("spend one"))
    inter = await h.fake.slash("quota", {"user": alice}, subcommand="show", user=admin)
    assert "4 credits left: 1 of 3 used this week, 2 bonus" in (await reply_of(h, inter))["content"]
    inter = await h.fake.slash("quota", {"user": alice}, subcommand="reset", user=admin)
    assert "Cleared 1 used credits" in (await reply_of(h, inter))["content"]
    inter = await h.fake.slash("quota", {"limit": 7, "period": "month"}, subcommand="default", user=admin)
    assert "7 credits per month" in (await reply_of(h, inter))["content"]


async def test_quota_on_a_bot_is_refused(h: Harness) -> None:
    admin_role = h.fake.add_role(h.fake.guild, "mods", permissions=1 << 5)  # MANAGE_GUILD
    admin = h.fake.add_member(h.fake.guild, "modsy", roles=[admin_role])
    other_bot = h.fake.add_member(h.fake.guild, h.fake.add_user("helper", bot=True)).user
    for target in (h.fake.bot_user, other_bot):
        for sub, options in (
            ("grant", {"user": target, "amount": 5}),
            ("set", {"user": target, "limit": 3}),
            ("show", {"user": target}),
            ("reset", {"user": target}),
        ):
            inter = await h.fake.slash("quota", options, subcommand=sub, user=admin)
            answer = await reply_of(h, inter)
            assert answer["flags"] & EPHEMERAL and "is a bot" in answer["content"]
    async with h.sessions() as session:
        rows = (await session.scalars(select(Member.user_id))).all()
    assert h.fake.bot_user.id not in rows and other_bot.id not in rows


async def test_admin_by_configured_id_sees_status(tmp_path: Path, sqlite_url: str) -> None:
    async with bot_harness(tmp_path, sqlite_url, FakeDispatcher(), start=False) as h:
        h.settings.admin_user_ids = [h.fake.user.id]
        await h.start_bot()
        job = await h.job_for(await h.imagine("counted"))
        await h.wait_job(job.id, lambda j: j.status == JobStatus.QUEUED)  # released to the broker
        inter = await h.fake.slash("status")
        text = (await reply_of(h, inter))["content"]
        assert "Queue `gpu` (sdxl)" in text and "1 queued" in text
        assert "Workers online: **1**" in text
        assert "Last hour: 1 jobs" in text
