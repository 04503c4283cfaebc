"""Credits on both backends: limits, periods, grants, refunds and races between transactions."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.credits import CreditReport, InsufficientCredits, QuotaDefaults, period_bounds
from bot.models import CreditEntry, Guild, LedgerKind, Member
from bot.quota import get_or_create_member, refund, report, reserve
from bot.quota_admin import grant, reset_usage, set_guild_default, set_member_limit
from bot.settings import BotSettings, Period

Sessions = async_sessionmaker[AsyncSession]

GUILD = 1000
USER = 42
# A Wednesday in the middle of a month, so day, week and month boundaries all differ.
NOW = datetime(2024, 5, 15, 13, 30, tzinfo=UTC)
DAILY = QuotaDefaults(limit=5, period=Period.DAY)


async def new_member(sessions: Sessions, guild_id: int = GUILD, user_id: int = USER) -> int:
    async with sessions() as session, session.begin():
        member = await get_or_create_member(session, guild_id, user_id, "Ada")
        return member.id


async def try_reserve(
    sessions: Sessions,
    member_id: int,
    job_id: str,
    cost: int,
    defaults: QuotaDefaults = DAILY,
    now: datetime = NOW,
) -> bool:
    """Reserve in its own transaction, as the bot does; False when the member cannot afford it."""
    async with sessions() as session, session.begin():
        try:
            await reserve(session, member_id, job_id, cost, defaults, now=now)
        except InsufficientCredits:
            return False
        return True


async def get_report(
    sessions: Sessions, member_id: int, defaults: QuotaDefaults = DAILY, now: datetime = NOW
) -> CreditReport:
    async with sessions() as session:
        return await report(session, member_id, defaults, now=now)


async def ledger(sessions: Sessions, kind: LedgerKind | None = None) -> list[CreditEntry]:
    async with sessions() as session:
        query = select(CreditEntry).order_by(CreditEntry.id)
        if kind is not None:
            query = query.where(CreditEntry.kind == kind.value)
        return list((await session.execute(query)).scalars())


# --- period arithmetic (pure) -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("now", "period", "start", "end"),
    [
        (NOW, Period.DAY, datetime(2024, 5, 15, tzinfo=UTC), datetime(2024, 5, 16, tzinfo=UTC)),
        (NOW, Period.WEEK, datetime(2024, 5, 13, tzinfo=UTC), datetime(2024, 5, 20, tzinfo=UTC)),
        (NOW, Period.MONTH, datetime(2024, 5, 1, tzinfo=UTC), datetime(2024, 6, 1, tzinfo=UTC)),
        # Monday 00:00 is the first instant of its week; Sunday 23:59 the last of the previous one.
        (datetime(2024, 5, 13, tzinfo=UTC), Period.WEEK, datetime(2024, 5, 13, tzinfo=UTC), None),
        (datetime(2024, 5, 12, 23, 59, tzinfo=UTC), Period.WEEK, datetime(2024, 5, 6, tzinfo=UTC), None),
        (datetime(2024, 12, 31, 23, 0, tzinfo=UTC), Period.MONTH, None, datetime(2025, 1, 1, tzinfo=UTC)),
        (datetime(2024, 2, 29, tzinfo=UTC), Period.MONTH, None, datetime(2024, 3, 1, tzinfo=UTC)),
        # Another zone and naive datetimes are both read as the same instant in UTC.
        (
            datetime(2024, 5, 16, 1, 0, tzinfo=timezone(timedelta(hours=3))),
            Period.DAY,
            datetime(2024, 5, 15, tzinfo=UTC),
            None,
        ),
        (datetime(2024, 5, 15, 23, 59), Period.DAY, datetime(2024, 5, 15, tzinfo=UTC), None),
    ],
)
def test_period_bounds(now: datetime, period: Period, start: datetime | None, end: datetime | None) -> None:
    got_start, got_end = period_bounds(now, period)
    if start is not None:
        assert got_start == start
    if end is not None:
        assert got_end == end
    assert got_start <= now.replace(tzinfo=now.tzinfo or UTC) < got_end


def test_defaults_from_settings() -> None:
    settings = BotSettings(credit_limit=7, credit_period=Period.WEEK)
    assert QuotaDefaults.from_settings(settings) == QuotaDefaults(limit=7, period=Period.WEEK)


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


async def test_refund_after_period_reset_never_goes_below_zero(sessions: Sessions) -> None:
    member_id = await new_member(sessions)
    assert await try_reserve(sessions, member_id, "old", 3)
    tomorrow = NOW + timedelta(days=1)
    assert await try_reserve(sessions, member_id, "new", 1, now=tomorrow)
    async with sessions() as session, session.begin():
        assert await refund(session, "old", now=tomorrow)
    rep = await get_report(sessions, member_id, now=tomorrow)
    assert (rep.used, rep.remaining) == (0, 5)


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
        assert await reset_usage(session, member_id, actor_id=7) == 5
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
            await reset_usage(session, 999, actor_id=7)


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
