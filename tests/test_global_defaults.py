"""The owners' global defaults (/mirage defaults, bot.global_defaults), through the fake Discord.

They sit between the settings and each guild's and member's own: a guild's allowance and a
member's engine or visibility still win; with none set, the global defaults apply to every job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from bot.cogs.owner import NOT_OWNER, Owner
from bot.models import GlobalDefaults, Guild, Member
from tests.botutil import EPHEMERAL, FakeDispatcher, Harness, bot_harness, reply_of

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def h(tmp_path: Path, sqlite_url: str) -> Any:
    """A bot whose fake user is an owner; settings: 25 credits a day, SDXL, public."""
    async with bot_harness(tmp_path, sqlite_url, FakeDispatcher(), start=False) as harness:
        harness.settings.owner_user_ids = [harness.fake.user.id]
        harness.settings.credit_limit = 25
        await harness.start_bot()
        yield harness


async def defaults(h: Harness, **options: Any) -> str:
    inter = await h.fake.slash("mirage", options, subcommand="defaults")
    callback = await inter.callback()
    assert callback.message_payload["flags"] & EPHEMERAL
    return str(callback.message_payload["content"])


async def test_global_defaults_apply_below_guild_and_member_settings(h: Harness) -> None:
    shown = await defaults(h, credit_limit=2, period="week", engine="openai", visibility="stealth")
    assert shown == "Global defaults: 2 credits per week, engine openai, visibility stealth."
    job = await h.job_for(await h.imagine("a fox"))
    assert job.engine == "openai" and job.visibility == "stealth" and job.cost == 2
    refused = await h.imagine("a second fox")
    assert "0 credits left" in (await reply_of(h, refused))["content"]
    # The guild's own allowance and the member's own engine and visibility win.
    async with h.sessions() as session, session.begin():
        await session.execute(update(Guild).where(Guild.id == h.fake.guild.id).values(credit_limit=10))
        await session.execute(
            update(Member)
            .where(Member.user_id == h.fake.user.id)
            .values(default_engine="sdxl", visibility="public")
        )
    job = await h.job_for(await h.imagine("a third fox"))
    assert job.engine == "sdxl" and job.visibility == "public" and job.cost == 1


async def test_reset_and_partial_changes(h: Harness) -> None:
    assert (await defaults(h)).endswith(
        "From the settings: credit_limit, credit_period, default_engine, default_visibility."
    )
    assert (await defaults(h, credit_limit=5)).startswith("Global defaults: 5 credits per day,")
    shown = await defaults(h, engine="openai")
    assert "5 credits per day, engine openai" in shown  # the limit stayed
    assert (await defaults(h, credit_limit=-1)).startswith("Global defaults: 25 credits per day,")
    shown = await defaults(h, reset=True)
    assert "engine sdxl, visibility public" in shown and "credit_limit, credit_period" in shown
    job = await h.job_for(await h.imagine("a fox"))
    assert job.engine == "sdxl"


async def test_defaults_are_for_owners_only(h: Harness) -> None:
    stranger = h.fake.add_member(h.fake.guild, "stranger")
    inter = await h.fake.slash("mirage", {"credit_limit": 0}, subcommand="defaults", user=stranger)
    callback = await inter.callback()
    assert callback.message_payload["content"] == NOT_OWNER
    async with h.sessions() as session:
        assert (await session.scalars(select(GlobalDefaults))).first() is None


async def test_imagine_prices_its_question_with_the_global_engine(h: Harness) -> None:
    h.settings.price_confirm_at = 2  # an OpenAI grid (2 credits) asks, an SDXL grid (1) does not
    await defaults(h, engine="openai")
    inter = await h.imagine("a fox")
    question = await h.fake.wait_for_request(
        lambda r: (
            r.interaction_token == inter.token and r.route in ("webhook_execute", "webhook_message_edit")
        )
    )
    assert "2 credits" in str(question.message_payload["content"])
    assert await h.job_count() == 0


async def test_a_server_default_without_a_period_names_the_period_that_applies(h: Harness) -> None:
    await defaults(h, period="week")
    inter = await h.fake.slash("quota", {"limit": 7}, subcommand="default")
    assert "7 credits per week" in (await reply_of(h, inter))["content"]


def test_the_global_credit_limit_fits_the_database_column() -> None:
    """GlobalDefaults.credit_limit is a 32-bit integer on PostgreSQL: Discord must not send more."""
    param = Owner.defaults.get_parameter("credit_limit")
    assert param is not None and param.max_value is not None and param.max_value <= 2**31 - 1
