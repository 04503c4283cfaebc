"""Credits on both backends: members, reservations, refunds, period resets and races between transactions."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from bot.credits import InsufficientCredits, QuotaDefaults, period_bounds
from bot.models import Guild, LedgerKind, Member
from bot.quota import get_or_create_member, refund, report, reserve
from bot.settings import Period
from tests.quotautil import DAILY, GUILD, NOW, USER, Sessions, get_report, ledger, new_member, try_reserve

# --- members ------------------------------------------------------------------------------------


async def test_get_or_create_member_creates_guild_once_and_races_safely(sessions: Sessions) -> None:
    async def create() -> int:
        async with sessions() as session, session.begin():
            return (await get_or_create_member(session, GUILD, USER, "Ada")).id

    ids = await asyncio.gather(*(create() for _ in range(8)))
    assert len(set(ids)) == 1
    async with sessions() as session, session.begin():
        assert await session.scalar(select(func.count()).select_from(Member)) == 1
        assert await session.scalar(select(func.count()).select_from(Guild)) == 1
        member = await get_or_create_member(session, GUILD, USER, "Ada Lovelace")
        assert member.id == ids[0]
        assert (member.display_name, member.credits_used, member.bonus_credits) == ("Ada Lovelace", 0, 0)
        assert len(member.public_id) >= 16
        # An empty display name never overwrites a known one; DMs live in guild 0.
        assert (await get_or_create_member(session, GUILD, USER)).display_name == "Ada Lovelace"
        dm = await get_or_create_member(session, 0, USER)
        assert dm.id != member.id and dm.guild_id == 0


# --- reserve ------------------------------------------------------------------------------------


async def test_reserve_within_and_over_limit(sessions: Sessions) -> None:
    member_id = await new_member(sessions)
    assert await try_reserve(sessions, member_id, "job-1", 2)
    assert await try_reserve(sessions, member_id, "job-2", 2)
    async with sessions() as session:
        with pytest.raises(InsufficientCredits) as caught:
            async with session.begin():
                await reserve(session, member_id, "job-3", 2, DAILY, now=NOW)
    assert (caught.value.cost, caught.value.remaining) == (2, 1)
    assert caught.value.resets_at == datetime(2024, 5, 16, tzinfo=UTC)
    assert "1 credit left" in str(caught.value)
    assert await try_reserve(sessions, member_id, "job-3", 1)
    assert not await try_reserve(sessions, member_id, "job-4", 1)
    rep = await get_report(sessions, member_id)
    assert (rep.used, rep.remaining, rep.limit, rep.period) == (5, 0, 5, Period.DAY)
    assert [e.job_id for e in await ledger(sessions, LedgerKind.RESERVE)] == ["job-1", "job-2", "job-3"]


async def test_refused_reservation_leaves_the_transaction_clean(sessions: Sessions) -> None:
    """A caller that catches InsufficientCredits and commits anyway has charged nothing."""
    member_id = await new_member(sessions)
    async with sessions() as session, session.begin():
        with pytest.raises(InsufficientCredits):
            await reserve(session, member_id, "big", 6, DAILY, now=NOW)
    assert await ledger(sessions) == []
    assert (await get_report(sessions, member_id)).used == 0
    assert await try_reserve(sessions, member_id, "big", 5)  # the same job id can still be reserved


async def test_reserving_the_same_job_twice_charges_once(sessions: Sessions) -> None:
    member_id = await new_member(sessions)
    assert await try_reserve(sessions, member_id, "job-1", 3)
    assert await try_reserve(sessions, member_id, "job-1", 3)
    async with sessions() as session, session.begin():
        await reserve(session, member_id, "job-2", 1, DAILY, now=NOW)
        await reserve(session, member_id, "job-2", 1, DAILY, now=NOW)
    assert (await get_report(sessions, member_id)).used == 4
    assert len(await ledger(sessions, LedgerKind.RESERVE)) == 2


async def test_cost_zero_always_succeeds_and_is_recorded(sessions: Sessions) -> None:
    member_id = await new_member(sessions)
    broke = QuotaDefaults(limit=0, period=Period.DAY)
    assert await try_reserve(sessions, member_id, "crop", 0, broke)
    assert not await try_reserve(sessions, member_id, "grid", 1, broke)
    entries = await ledger(sessions, LedgerKind.RESERVE)
    assert [(e.job_id, e.amount) for e in entries] == [("crop", 0)]
    async with sessions() as session, session.begin():
        assert await refund(session, "crop", now=NOW)
    assert (await get_report(sessions, member_id, broke)).used == 0


async def test_unknown_member_and_negative_cost(sessions: Sessions) -> None:
    async with sessions() as session, session.begin():
        with pytest.raises(LookupError):
            await reserve(session, 999, "job", 1, DAILY, now=NOW)
        with pytest.raises(ValueError):
            await reserve(session, 999, "job", -1, DAILY, now=NOW)
        with pytest.raises(LookupError):
            await report(session, 999, DAILY)


async def test_concurrent_reservations_never_overspend(sessions: Sessions) -> None:
    """50 transactions race for 10 credits: exactly 10 win, on both backends."""
    member_id = await new_member(sessions)
    ten = QuotaDefaults(limit=10, period=Period.DAY)
    results = await asyncio.gather(*(try_reserve(sessions, member_id, f"job-{i}", 1, ten) for i in range(50)))
    assert results.count(True) == 10
    rep = await get_report(sessions, member_id, ten)
    assert (rep.used, rep.remaining) == (10, 0)
    assert len(await ledger(sessions, LedgerKind.RESERVE)) == 10


async def test_concurrent_reservations_of_one_job_charge_once(sessions: Sessions) -> None:
    member_id = await new_member(sessions)
    results = await asyncio.gather(*(try_reserve(sessions, member_id, "same", 1) for _ in range(10)))
    assert all(results)
    assert (await get_report(sessions, member_id)).used == 1
    assert len(await ledger(sessions, LedgerKind.RESERVE)) == 1


# --- refund -------------------------------------------------------------------------------------


async def test_refund_twice_credits_once(sessions: Sessions) -> None:
    member_id = await new_member(sessions)
    assert await try_reserve(sessions, member_id, "job-1", 2)
    assert await try_reserve(sessions, member_id, "job-2", 1)
    async with sessions() as session, session.begin():
        assert await refund(session, "job-1", now=NOW)
    async with sessions() as session, session.begin():
        assert not await refund(session, "job-1", now=NOW)
        assert not await refund(session, "never-reserved", now=NOW)
    assert (await get_report(sessions, member_id)).used == 1
    refunds = await ledger(sessions, LedgerKind.REFUND)
    assert [(e.job_id, e.amount) for e in refunds] == [("job-1", -2)]


async def test_concurrent_refunds_credit_once(sessions: Sessions) -> None:
    member_id = await new_member(sessions)
    assert await try_reserve(sessions, member_id, "job-1", 3)

    async def refund_once() -> bool:
        async with sessions() as session, session.begin():
            return await refund(session, "job-1", now=NOW)

    results = await asyncio.gather(*(refund_once() for _ in range(5)))
    assert results.count(True) == 1
    assert (await get_report(sessions, member_id)).used == 0
    assert len(await ledger(sessions, LedgerKind.REFUND)) == 1


async def test_a_refund_after_midnight_returns_to_the_day_it_was_charged_in(sessions: Sessions) -> None:
    member_id = await new_member(sessions)
    assert await try_reserve(sessions, member_id, "old", 3)
    tomorrow = NOW + timedelta(days=1)
    assert await try_reserve(sessions, member_id, "new", 1, now=tomorrow)
    async with sessions() as session, session.begin():
        assert await refund(session, "old", now=tomorrow)
    rep = await get_report(sessions, member_id, now=tomorrow)
    assert (rep.used, rep.remaining) == (1, 4)  # the new day's allowance is not enlarged
    async with sessions() as session, session.begin():
        assert await refund(session, "new", now=tomorrow)
    rep = await get_report(sessions, member_id, now=tomorrow)
    assert (rep.used, rep.remaining) == (0, 5)  # a charge of the same day comes back in full


async def test_a_refund_before_any_new_charge_still_returns_to_its_own_period(sessions: Sessions) -> None:
    member_id = await new_member(sessions)
    assert await try_reserve(sessions, member_id, "late", 2, now=NOW.replace(hour=23, minute=59))
    tomorrow = NOW + timedelta(days=1)
    async with sessions() as session, session.begin():
        assert await refund(session, "late", now=tomorrow)
    assert (await get_report(sessions, member_id, now=tomorrow)).remaining == 5
    assert (await get_report(sessions, member_id, now=NOW)).used == 0  # yesterday got it back


# --- periods ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("period", "last_instant", "next_start"),
    [
        (Period.DAY, datetime(2024, 5, 15, 23, 59, 59, tzinfo=UTC), datetime(2024, 5, 16, tzinfo=UTC)),
        (Period.WEEK, datetime(2024, 5, 19, 23, 59, 59, tzinfo=UTC), datetime(2024, 5, 20, tzinfo=UTC)),
        (Period.MONTH, datetime(2024, 5, 31, 23, 59, 59, tzinfo=UTC), datetime(2024, 6, 1, tzinfo=UTC)),
    ],
)
async def test_usage_resets_at_period_boundary(
    sessions: Sessions, period: Period, last_instant: datetime, next_start: datetime
) -> None:
    member_id = await new_member(sessions)
    defaults = QuotaDefaults(limit=2, period=period)
    assert await try_reserve(sessions, member_id, "a", 2, defaults, now=NOW)
    # Still the same period at its very last second: nothing left, and it says when that changes.
    assert not await try_reserve(sessions, member_id, "b", 1, defaults, now=last_instant)
    rep = await get_report(sessions, member_id, defaults, now=last_instant)
    assert (rep.used, rep.remaining, rep.resets_at) == (2, 0, next_start)
    # From the first instant of the next period, the allowance is whole again.
    rep = await get_report(sessions, member_id, defaults, now=next_start)
    assert (rep.used, rep.remaining) == (0, 2)
    assert await try_reserve(sessions, member_id, "b", 2, defaults, now=next_start)
    assert not await try_reserve(sessions, member_id, "c", 1, defaults, now=next_start)
    async with sessions() as session:
        member = await session.get(Member, member_id)
        assert member is not None and member.period_start == period_bounds(next_start, period)[0]
