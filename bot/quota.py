"""Credits: reserve, refund and report, atomic under concurrency (admin changes: ``bot.quota_admin``).

Transaction rule: every function here runs its statements inside the caller's transaction and
never commits or rolls back. The bot reserves in the same transaction that inserts the Job row,
so a job and its charge are committed together or not at all. A function that raises leaves the
database as it found it apart from harmless bookkeeping (an expired period rolled over).

Accounting model, per member:

- ``credits_used`` counts the period allowance spent since ``period_start``; the allowance is the
  member's ``credit_limit``, else the guild's, else :class:`QuotaDefaults` (the period resolves
  the same way, independently). Periods start at 00:00 UTC: every day, every Monday, or on the
  first of the month. ``period_start`` is when the counted usage began: its period's start, or
  the instant of a later admin reset (``bot.quota_admin.reset_usage``).
- ``bonus_credits`` are granted by admins, spent only once the allowance is gone, and survive
  period resets.
- The ledger (``credit_entries``) has one ``reserve`` row and at most one ``refund`` row per job,
  enforced by UNIQUE(job_id, kind): that key, not a prior read, is what makes a second reserve or
  refund of the same job a no-op, also across concurrent transactions. The reserve row's note
  records how much came from the allowance and how much from bonus credits, so a refund puts
  each part back where it came from.

Concurrency: the reserve decision is one conditional UPDATE (``WHERE allowance + bonus >= cost``),
so two transactions can never both spend the last credit. On PostgreSQL the first UPDATE of the
member row also holds its row lock until commit; on SQLite ``BEGIN IMMEDIATE`` (bot.database)
serialises writers. Either way nothing changes the row between our statements, which is what
lets the allowance/bonus split be read off the returned values.

ORM note: statements here are Core statements; a ``Member`` already loaded in the session gets its
credit attributes updated in place from the returned values, so it does not go stale.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, case, delete, literal, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from bot.credits import CreditReport, InsufficientCredits, QuotaDefaults, _period, _utc, period_bounds
from bot.models import LedgerKind, Member, UTCDateTime, utcnow
from bot.quota_sql import (
    GUILDS,
    LEDGER,
    MEMBERS,
    dialect_insert,
    greatest,
    int_param,
    least,
    sync_member,
)
from bot.settings import Period

__all__ = [
    "CreditReport",
    "InsufficientCredits",
    "QuotaDefaults",
    "get_or_create_member",
    "period_bounds",
    "refund",
    "report",
    "reserve",
]

_SPLIT_RE = re.compile(r"allowance=(\d+) bonus=(\d+)")


@dataclass(frozen=True)
class _Effective:
    limit: int
    period: Period


def _effective(
    member_limit: int | None,
    member_period: str | None,
    guild_limit: int | None,
    guild_period: str | None,
    defaults: QuotaDefaults,
) -> _Effective:
    limit = member_limit if member_limit is not None else guild_limit
    period = _period(member_period) or _period(guild_period) or defaults.period
    return _Effective(limit=defaults.limit if limit is None else limit, period=period)


async def _account(session: AsyncSession, member_id: int) -> Row[Any]:
    """The member's and their guild's limit/period, with usage, bonus and period start.

    Columns: member limit, member period, guild limit, guild period, credits used, bonus
    credits, period start. Raises ``LookupError`` for an unknown member.
    """
    row = (
        await session.execute(
            select(
                MEMBERS.c.credit_limit,
                MEMBERS.c.credit_period,
                GUILDS.c.credit_limit,
                GUILDS.c.credit_period,
                MEMBERS.c.credits_used,
                MEMBERS.c.bonus_credits,
                MEMBERS.c.period_start,
            )
            .select_from(MEMBERS.outerjoin(GUILDS, GUILDS.c.id == MEMBERS.c.guild_id))
            .where(MEMBERS.c.id == member_id)
        )
    ).first()
    if row is None:
        raise LookupError(f"no member with id {member_id}")
    return row


async def _member_config(
    session: AsyncSession, member_id: int
) -> tuple[int | None, str | None, int | None, str | None]:
    row = await _account(session, member_id)
    return row[0], row[1], row[2], row[3]


async def get_or_create_member(
    session: AsyncSession, guild_id: int, user_id: int, display_name: str = ""
) -> Member:
    """The member row for ``user_id`` in ``guild_id`` (0 for DMs), created with its guild if new.

    Race-safe: both rows are inserted with ON CONFLICT DO NOTHING, then read, so two interactions
    from a new member at once end up with the same row. A non-empty ``display_name`` that differs
    from the stored one is updated. The returned object is freshly loaded from the database.
    """
    display_name = display_name[:100]
    now = utcnow()
    await session.execute(
        dialect_insert(session, GUILDS)
        .values(id=guild_id, name="", created_at=now)
        .on_conflict_do_nothing(index_elements=["id"])
    )
    await session.execute(
        dialect_insert(session, MEMBERS)
        .values(
            guild_id=guild_id,
            user_id=user_id,
            display_name=display_name,
            credits_used=0,
            bonus_credits=0,
            created_at=now,
        )
        .on_conflict_do_nothing(index_elements=["guild_id", "user_id"])
    )
    if display_name:
        await session.execute(
            update(MEMBERS)
            .where(
                MEMBERS.c.guild_id == guild_id,
                MEMBERS.c.user_id == user_id,
                MEMBERS.c.display_name != display_name,
            )
            .values(display_name=display_name)
        )
    result = await session.execute(
        select(Member)
        .where(Member.guild_id == guild_id, Member.user_id == user_id)
        .execution_options(populate_existing=True)
    )
    return result.scalar_one()


async def reserve(
    session: AsyncSession,
    member_id: int,
    job_id: str,
    cost: int,
    defaults: QuotaDefaults,
    now: datetime | None = None,
) -> None:
    """Charge ``cost`` credits for ``job_id``: the period allowance first, then bonus credits.

    Reserving a job that already has a reserve entry charges nothing (idempotent). Cost 0 always
    succeeds and is recorded. Raises :class:`InsufficientCredits` (nothing charged) when the
    allowance left plus bonus credits is below ``cost``, ``LookupError`` for an unknown member and
    ``ValueError`` for a negative cost. Does not commit.
    """
    if cost < 0:
        raise ValueError("cost must not be negative")
    now = _utc(now)
    eff = _effective(*await _member_config(session, member_id), defaults)
    start, end = period_bounds(now, eff.period)
    start_value = literal(start, UTCDateTime())

    # Roll an expired period over and pin the row: this UPDATE takes the PostgreSQL row lock that
    # the spend below relies on, and returns the state the spend starts from.
    stale = MEMBERS.c.period_start.is_(None) | (MEMBERS.c.period_start < start_value)
    before = (
        await session.execute(
            update(MEMBERS)
            .where(MEMBERS.c.id == member_id)
            .values(
                credits_used=case((stale, int_param(0)), else_=MEMBERS.c.credits_used),
                period_start=case((stale, start_value), else_=MEMBERS.c.period_start),
            )
            .returning(MEMBERS.c.credits_used, MEMBERS.c.bonus_credits, MEMBERS.c.period_start)
        )
    ).one_or_none()
    if before is None:
        raise LookupError(f"no member with id {member_id}")
    used_before, bonus_before, period_start = before
    sync_member(session, member_id, credits_used=used_before, period_start=period_start)

    # The ledger key is the idempotency guard: a job already reserved inserts nothing here.
    entry_id = (
        await session.execute(
            dialect_insert(session, LEDGER)
            .values(
                member_id=member_id,
                job_id=job_id,
                kind=LedgerKind.RESERVE.value,
                amount=cost,
                note="",
                created_at=now,
            )
            .on_conflict_do_nothing(index_elements=["job_id", "kind"])
            .returning(LEDGER.c.id)
        )
    ).scalar_one_or_none()
    if entry_id is None:
        return

    from_allowance, from_bonus = 0, 0
    if cost > 0:
        used, bonus = MEMBERS.c.credits_used, MEMBERS.c.bonus_credits
        allowance_left = greatest(int_param(eff.limit) - used, int_param(0))
        take = least(allowance_left, int_param(cost))
        spent = (
            await session.execute(
                update(MEMBERS)
                .where(MEMBERS.c.id == member_id, allowance_left + bonus >= int_param(cost))
                .values(credits_used=used + take, bonus_credits=bonus - (int_param(cost) - take))
                .returning(MEMBERS.c.credits_used, MEMBERS.c.bonus_credits)
            )
        ).one_or_none()
        if spent is None:
            await session.execute(delete(LEDGER).where(LEDGER.c.id == entry_id))
            remaining = max(eff.limit - used_before, 0) + bonus_before
            raise InsufficientCredits(cost=cost, remaining=remaining, resets_at=end)
        used_after, bonus_after = spent
        from_allowance, from_bonus = used_after - used_before, bonus_before - bonus_after
        if from_allowance + from_bonus != cost:  # only if the row changed under us: a locking bug
            raise RuntimeError(f"credit row for member {member_id} changed during reserve of job {job_id}")
        sync_member(session, member_id, credits_used=used_after, bonus_credits=bonus_after)

    await session.execute(
        update(LEDGER)
        .where(LEDGER.c.id == entry_id)
        .values(note=f"allowance={from_allowance} bonus={from_bonus}")
    )


async def refund(session: AsyncSession, job_id: str, now: datetime | None = None) -> bool:
    """Give back what ``job_id`` reserved, exactly once.

    Returns True when this call refunded, False when the job was never reserved or was already
    refunded (also when another transaction refunds it concurrently: the UNIQUE(job_id, kind)
    insert decides). Allowance credits go back to the usage they were counted in: to the current
    usage (never below 0) while it lasts, nowhere once a new period has started or an admin reset
    cleared it, so a refund after midnight or after a reset never enlarges the fresh allowance.
    Bonus credits go back to the bonus balance. Does not commit.
    """
    now = _utc(now)
    reserved = (
        await session.execute(
            select(LEDGER.c.member_id, LEDGER.c.amount, LEDGER.c.note, LEDGER.c.created_at).where(
                LEDGER.c.job_id == job_id, LEDGER.c.kind == LedgerKind.RESERVE.value
            )
        )
    ).one_or_none()
    if reserved is None:
        return False
    member_id, amount, note, charged_at = reserved
    split = _SPLIT_RE.search(note or "")
    from_allowance, from_bonus = (int(split[1]), int(split[2])) if split else (amount, 0)

    entry_id = (
        await session.execute(
            dialect_insert(session, LEDGER)
            .values(
                member_id=member_id,
                job_id=job_id,
                kind=LedgerKind.REFUND.value,
                amount=-(from_allowance + from_bonus),
                note=f"allowance={from_allowance} bonus={from_bonus}",
                created_at=now,
            )
            .on_conflict_do_nothing(index_elements=["job_id", "kind"])
            .returning(LEDGER.c.id)
        )
    ).scalar_one_or_none()
    if entry_id is None:
        return False

    used = MEMBERS.c.credits_used
    # The usage row counts from period_start; a charge made before that belonged to usage that is
    # over (an earlier period, or cleared by an admin reset), and giving it back would enlarge
    # the usage counted since.
    charged_in_old_period = MEMBERS.c.period_start > literal(_utc(charged_at), UTCDateTime())
    after = (
        await session.execute(
            update(MEMBERS)
            .where(MEMBERS.c.id == member_id)
            .values(
                credits_used=case(
                    (charged_in_old_period, used),
                    else_=greatest(used - int_param(from_allowance), int_param(0)),
                ),
                bonus_credits=MEMBERS.c.bonus_credits + int_param(from_bonus),
            )
            .returning(MEMBERS.c.credits_used, MEMBERS.c.bonus_credits)
        )
    ).one_or_none()
    if after is not None:
        sync_member(session, member_id, credits_used=after[0], bonus_credits=after[1])
    return True


async def report(
    session: AsyncSession, member_id: int, defaults: QuotaDefaults, now: datetime | None = None
) -> CreditReport:
    """The member's credits as of ``now``. Read-only: an expired period simply reads as unused."""
    now = _utc(now)
    row = await _account(session, member_id)
    eff = _effective(row[0], row[1], row[2], row[3], defaults)
    start, end = period_bounds(now, eff.period)
    period_start = row[6]
    used = 0 if period_start is None or period_start < start else row[4]
    bonus = row[5]
    return CreditReport(
        limit=eff.limit,
        period=eff.period,
        used=used,
        bonus=bonus,
        remaining=max(eff.limit - used, 0) + bonus,
        resets_at=end,
    )
