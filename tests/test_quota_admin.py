"""Credits administration on both backends: limits and their precedence, grants, usage resets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from bot.models import LedgerKind
from bot.quota import get_or_create_member, refund, reserve
from bot.quota_admin import MAX_CREDITS, grant, reset_usage, set_guild_default, set_member_limit
from bot.settings import Period
from tests.quotautil import DAILY, GUILD, NOW, USER, Sessions, get_report, ledger, new_member, try_reserve

# --- limits and precedence ----------------------------------------------------------------------


async def test_member_limit_overrides_guild_which_overrides_settings(sessions: Sessions) -> None:
    member_id = await new_member(sessions)
    other_id = await new_member(sessions, user_id=USER + 1)
    elsewhere_id = await new_member(sessions, guild_id=GUILD + 1)

    rep = await get_report(sessions, member_id)
    assert (rep.limit, rep.period) == (5, Period.DAY)

    async with sessions() as session, session.begin():
        await set_guild_default(session, GUILD, 3, Period.WEEK)
    for mid in (member_id, other_id):
        rep = await get_report(sessions, mid)
        assert (rep.limit, rep.period, rep.resets_at) == (3, Period.WEEK, datetime(2024, 5, 20, tzinfo=UTC))
    assert (await get_report(sessions, elsewhere_id)).limit == 5

    async with sessions() as session, session.begin():
        await set_member_limit(session, member_id, 8, Period.MONTH)
    rep = await get_report(sessions, member_id)
    assert (rep.limit, rep.period, rep.resets_at) == (8, Period.MONTH, datetime(2024, 6, 1, tzinfo=UTC))
    assert await try_reserve(sessions, member_id, "m", 8)
    assert await try_reserve(sessions, other_id, "o", 3)
    assert not await try_reserve(sessions, other_id, "o2", 1)

    # A member limit without a period keeps the guild's period, and the usage so far.
    async with sessions() as session, session.begin():
        await set_member_limit(session, other_id, 4, None)
    rep = await get_report(sessions, other_id)
    assert (rep.limit, rep.period, rep.used, rep.remaining) == (4, Period.WEEK, 3, 1)
    # Clearing both falls back to the settings; moving to a shorter period (week -> day) starts a
    # fresh one, since usage that began before today's start cannot be told apart from older use.
    async with sessions() as session, session.begin():
        await set_member_limit(session, member_id, None, None)
        await set_guild_default(session, GUILD, None, None)
    rep = await get_report(sessions, other_id)
    assert (rep.limit, rep.period, rep.used, rep.remaining) == (4, Period.DAY, 0, 4)
    assert (await get_report(sessions, member_id)).limit == 5

    async with sessions() as session, session.begin():
        with pytest.raises(LookupError):
            await set_member_limit(session, 999, 1, None)
        with pytest.raises(ValueError):
            await set_member_limit(session, member_id, -1, None)


async def test_lowered_limit_spends_bonus_only(sessions: Sessions) -> None:
    member_id = await new_member(sessions)
    assert await try_reserve(sessions, member_id, "a", 4)
    async with sessions() as session, session.begin():
        await set_member_limit(session, member_id, 2, None)
        await grant(session, member_id, 1, actor_id=7)
    rep = await get_report(sessions, member_id)
    assert (rep.used, rep.bonus, rep.remaining) == (4, 1, 1)
    assert await try_reserve(sessions, member_id, "b", 1)
    assert (await get_report(sessions, member_id)).remaining == 0


# --- grants and admin reset ---------------------------------------------------------------------


async def test_grants_are_spent_after_the_allowance_and_survive_resets(sessions: Sessions) -> None:
    member_id = await new_member(sessions)
    async with sessions() as session, session.begin():
        assert await grant(session, member_id, 4, actor_id=7, note="contest winner") == 4
    assert await try_reserve(sessions, member_id, "a", 3)
    rep = await get_report(sessions, member_id)
    assert (rep.used, rep.bonus, rep.remaining) == (3, 4, 6)
    # Crosses from allowance into bonus: 2 from the allowance, 1 from the grant.
    assert await try_reserve(sessions, member_id, "b", 3)
    rep = await get_report(sessions, member_id)
    assert (rep.used, rep.bonus, rep.remaining) == (5, 3, 3)

    tomorrow = NOW + timedelta(days=1)
    rep = await get_report(sessions, member_id, now=tomorrow)
    assert (rep.used, rep.bonus, rep.remaining) == (0, 3, 8)
    assert await try_reserve(sessions, member_id, "c", 8, now=tomorrow)
    assert not await try_reserve(sessions, member_id, "d", 1, now=tomorrow)

    # Refunds put each part back where it came from: "b" took 1 bonus credit, "c" took 3.
    async with sessions() as session, session.begin():
        assert await refund(session, "b", now=tomorrow)
        assert await refund(session, "c", now=tomorrow)
    rep = await get_report(sessions, member_id, now=tomorrow)
    assert (rep.used, rep.bonus) == (0, 4)
    notes = {e.job_id: e.note for e in await ledger(sessions, LedgerKind.RESERVE)}
    assert notes == {"a": "allowance=3 bonus=0", "b": "allowance=2 bonus=1", "c": "allowance=5 bonus=3"}
    grants = await ledger(sessions, LedgerKind.GRANT)
    assert [(g.amount, g.actor_id, g.note) for g in grants] == [(-4, 7, "contest winner")]


async def test_grant_take_back(sessions: Sessions) -> None:
    member_id = await new_member(sessions)
    async with sessions() as session, session.begin():
        await grant(session, member_id, 3, actor_id=7)
        assert await grant(session, member_id, -2, actor_id=7) == 1
        with pytest.raises(ValueError, match="has 1 granted"):
            await grant(session, member_id, -2, actor_id=7)
        with pytest.raises(ValueError):
            await grant(session, member_id, 0, actor_id=7)
        with pytest.raises(LookupError):
            await grant(session, 999, 1, actor_id=7)
    assert [g.amount for g in await ledger(sessions, LedgerKind.GRANT)] == [-3, 2]


async def test_reset_usage(sessions: Sessions) -> None:
    member_id = await new_member(sessions)
    async with sessions() as session, session.begin():
        await grant(session, member_id, 2, actor_id=7)
    assert await try_reserve(sessions, member_id, "a", 6)
    async with sessions() as session, session.begin():
        assert await reset_usage(session, member_id, 7, DAILY, now=NOW + timedelta(minutes=1)) == 5
    rep = await get_report(sessions, member_id)
    assert (rep.used, rep.bonus, rep.remaining) == (0, 1, 6)
    # Refunding a job reserved before the reset gives back its bonus part; usage stays at 0.
    async with sessions() as session, session.begin():
        assert await refund(session, "a", now=NOW)
    rep = await get_report(sessions, member_id)
    assert (rep.used, rep.bonus) == (0, 2)
    resets = await ledger(sessions, LedgerKind.RESET)
    assert [(r.amount, r.actor_id) for r in resets] == [(-5, 7)]
    async with sessions() as session, session.begin():
        with pytest.raises(LookupError):
            await reset_usage(session, 999, actor_id=7, defaults=DAILY)


async def test_a_refund_of_a_job_charged_before_a_reset_does_not_enlarge_the_fresh_allowance(
    sessions: Sessions,
) -> None:
    """The reset already forgave what was used before it; refunding that again would overspend."""
    member_id = await new_member(sessions)
    assert await try_reserve(sessions, member_id, "before", 3)
    async with sessions() as session, session.begin():
        cleared = await reset_usage(session, member_id, 7, DAILY, now=NOW + timedelta(minutes=1))
    assert cleared == 3
    later = NOW + timedelta(minutes=2)
    assert await try_reserve(sessions, member_id, "after", 5, now=later)
    async with sessions() as session, session.begin():
        assert await refund(session, "before", now=later)
    rep = await get_report(sessions, member_id, now=later)
    assert (rep.used, rep.remaining) == (5, 0)
    assert not await try_reserve(sessions, member_id, "more", 1, now=later)
    # A job charged after the reset still comes back in full.
    async with sessions() as session, session.begin():
        assert await refund(session, "after", now=later)
    assert (await get_report(sessions, member_id, now=later)).used == 0


async def test_reset_clears_only_usage_of_the_current_period(sessions: Sessions) -> None:
    """Yesterday's usage has expired already: a reset today clears nothing and says so."""
    member_id = await new_member(sessions)
    assert await try_reserve(sessions, member_id, "yesterday", 3)
    async with sessions() as session, session.begin():
        cleared = await reset_usage(session, member_id, 7, DAILY, now=NOW + timedelta(days=1))
    assert cleared == 0
    assert [r.amount for r in await ledger(sessions, LedgerKind.RESET)] == [0]


async def test_limits_and_grants_stay_within_the_database_integer(sessions: Sessions) -> None:
    """PostgreSQL stores credits as 32-bit integers: too much is refused, nothing overflows."""
    member_id = await new_member(sessions)
    async with sessions() as session, session.begin():
        assert await grant(session, member_id, MAX_CREDITS, actor_id=7) == MAX_CREDITS
    async with sessions() as session, session.begin():
        with pytest.raises(ValueError, match="at most"):
            await grant(session, member_id, 1, actor_id=7)
        with pytest.raises(ValueError, match="at most"):
            await grant(session, member_id, 2**31, actor_id=7)
        with pytest.raises(ValueError, match="at most"):
            await set_member_limit(session, member_id, 2**31, None)
        with pytest.raises(ValueError, match="at most"):
            await set_guild_default(session, GUILD, 2**31, None)
    assert (await get_report(sessions, member_id)).bonus == MAX_CREDITS


async def test_loaded_member_object_follows_the_account(sessions: Sessions) -> None:
    """The bot may hold a Member from get_or_create_member while charging it in the same session."""
    async with sessions() as session, session.begin():
        member = await get_or_create_member(session, GUILD, USER)
        await reserve(session, member.id, "a", 2, DAILY, now=NOW)
        assert (member.credits_used, member.period_start) == (2, datetime(2024, 5, 15, tzinfo=UTC))
        await grant(session, member.id, 3, actor_id=7)
        assert member.bonus_credits == 3
        await refund(session, "a", now=NOW)
        assert member.credits_used == 0
        await set_member_limit(session, member.id, 9, Period.WEEK)
        assert (member.credit_limit, member.credit_period) == (9, "week")
        assert member not in session.dirty
