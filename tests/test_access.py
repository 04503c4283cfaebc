"""Who may use the bot: allowed and approved guilds, bans, DMs, credits power; button actions that fit."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot import quota
from bot.access import (
    DMS_REFUSED,
    DOES_NOT_FIT,
    GUILD_BANNED,
    GUILD_NOT_APPROVED,
    MEMBER_BANNED,
    check_actor,
    check_fits,
    guild_approved,
)
from bot.models import Guild, Job, Member
from bot.operations import Actor, JobRefused, Operation
from bot.settings import BotSettings
from workers.schema import JobKind

Sessions = async_sessionmaker[AsyncSession]


def settings(**overrides: Any) -> BotSettings:
    return BotSettings(_env_file=None, **overrides)  # type: ignore[call-arg]


def actor(guild_id: int = 10, user_id: int = 7) -> Actor:
    return Actor(guild_id=guild_id, channel_id=1, user_id=user_id, display_name="someone")


async def refusal(sessions: Sessions, config: BotSettings, who: Actor) -> str | None:
    async with sessions() as session:
        try:
            await check_actor(session, config, who)
        except JobRefused as exc:
            return str(exc)
    return None


async def test_any_guild_may_generate_when_none_is_listed(sessions: Sessions) -> None:
    assert await refusal(sessions, settings(), actor(guild_id=99)) is None


async def test_an_unlisted_guild_is_refused_until_an_owner_approves_it(sessions: Sessions) -> None:
    config = settings(allowed_guild_ids=[10])
    assert await refusal(sessions, config, actor(guild_id=10)) is None
    assert await refusal(sessions, config, actor(guild_id=99)) == GUILD_NOT_APPROVED
    async with sessions() as session, session.begin():
        session.add(Guild(id=99, name="", approved=True))
    assert await refusal(sessions, config, actor(guild_id=99)) is None


async def test_a_banned_guild_is_refused_even_when_listed(sessions: Sessions) -> None:
    async with sessions() as session, session.begin():
        session.add(Guild(id=10, name="", banned=True))
    assert await refusal(sessions, settings(allowed_guild_ids=[10]), actor(guild_id=10)) == GUILD_BANNED
    assert await refusal(sessions, settings(), actor(guild_id=10)) == GUILD_BANNED


async def test_dms_are_refused_unless_allowed(sessions: Sessions) -> None:
    assert await refusal(sessions, settings(), actor(guild_id=0)) == DMS_REFUSED
    assert await refusal(sessions, settings(allow_dms=True), actor(guild_id=0)) is None


async def test_a_member_banned_here_or_everywhere_is_refused(sessions: Sessions) -> None:
    async with sessions() as session, session.begin():
        member = await quota.get_or_create_member(session, 10, 7, "someone")
        member.banned = True
        everywhere = await quota.get_or_create_member(session, 0, 8, "other")
        everywhere.banned = True
    assert await refusal(sessions, settings(), actor(guild_id=10, user_id=7)) == MEMBER_BANNED
    assert await refusal(sessions, settings(), actor(guild_id=11, user_id=7)) is None
    assert await refusal(sessions, settings(), actor(guild_id=11, user_id=8)) == MEMBER_BANNED


async def test_a_dm_is_refused_when_the_member_is_banned_in_the_guild_that_pays_for_it(
    sessions: Sessions,
) -> None:
    """A DM job is charged to the member's last guild account; a ban there must hold in DMs too."""
    async with sessions() as session, session.begin():
        member = await quota.get_or_create_member(session, 10, 7, "someone")
        member.banned = True
        session.add(
            Job(
                id="earlier",
                member_id=member.id,
                user_id=7,
                guild_id=10,
                channel_id=1,
                kind=JobKind.IMAGINE.value,
                engine="sdxl",
                visibility="public",
            )
        )
    assert await refusal(sessions, settings(allow_dms=True), actor(guild_id=0, user_id=7)) == MEMBER_BANNED
    # A member banned nowhere keeps using DMs.
    assert await refusal(sessions, settings(allow_dms=True), actor(guild_id=0, user_id=8)) is None


async def test_credits_power_needs_an_approved_guild_even_when_any_guild_may_generate(
    sessions: Sessions,
) -> None:
    async with sessions() as session:
        assert not await guild_approved(session, settings(), 99)
        assert await guild_approved(session, settings(allowed_guild_ids=[99]), 99)
    async with sessions() as session, session.begin():
        session.add(Guild(id=99, name="", approved=True))
    async with sessions() as session:
        assert await guild_approved(session, settings(), 99)
    assert Member  # the model the bans live on


def job(kind: JobKind, guild_id: int = 10) -> Job:
    return Job(id="p", kind=kind.value, guild_id=guild_id, user_id=7)


@pytest.mark.parametrize(
    ("parent", "operation", "index"),
    [
        (JobKind.IMAGINE, Operation(JobKind.CROP), 2),
        (JobKind.IMAGINE, Operation(JobKind.VARIATION, strength=0.85), 3),
        (JobKind.REROLL, Operation(JobKind.REROLL), None),
        (JobKind.CROP, Operation(JobKind.UPSCALE, strength=0.35, scale=2.0), None),
        (JobKind.CROP, Operation(JobKind.VARIATION, strength=0.5), None),
        (JobKind.CROP, Operation(JobKind.ZOOM, scale=2.0), None),
        (JobKind.UPSCALE, Operation(JobKind.PAN), None),
    ],
)
def test_actions_the_parent_offers_fit(parent: JobKind, operation: Operation, index: int | None) -> None:
    check_fits(job(parent), operation, index, actor())


@pytest.mark.parametrize(
    ("parent", "operation", "index"),
    [
        (JobKind.IMAGINE, Operation(JobKind.UPSCALE, strength=0.35, scale=2.0), None),  # upscale a grid
        (JobKind.IMAGINE, Operation(JobKind.ZOOM, scale=2.0), None),
        (JobKind.IMAGINE, Operation(JobKind.CROP), None),  # U# without a tile
        (JobKind.CROP, Operation(JobKind.CROP), 1),  # U# of a single image
        (JobKind.CROP, Operation(JobKind.REROLL), None),
        (JobKind.UPSCALE, Operation(JobKind.UPSCALE, strength=0.35, scale=2.0), None),  # upscale twice
    ],
)
def test_a_forged_action_that_does_not_fit_is_refused(
    parent: JobKind, operation: Operation, index: int | None
) -> None:
    with pytest.raises(JobRefused, match=DOES_NOT_FIT):
        check_fits(job(parent), operation, index, actor())


def test_a_button_pressed_in_another_guild_is_refused() -> None:
    with pytest.raises(JobRefused, match=DOES_NOT_FIT):
        check_fits(job(JobKind.IMAGINE, guild_id=10), Operation(JobKind.CROP), 1, actor(guild_id=11))
