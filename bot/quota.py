"""Credits: reserve, refund and report, atomic under concurrency (admin changes: ``bot.quota_admin``).

Transaction rule: every function here runs its statements inside the caller's transaction and
never commits or rolls back. The bot reserves in the same transaction that inserts the Job row,
so a job and its charge are committed together or not at all. A function that raises leaves the
database as it found it apart from harmless bookkeeping (an expired period rolled over).

Accounting model, per member:

- ``credits_used`` counts the period allowance spent since ``period_start``; the allowance is the
  member's ``credit_limit``, else the guild's, else :class:`QuotaDefaults` (the period resolves
  the same way, independently). Periods start at 00:00 UTC: every day, every Monday, or on the
  first of the month.
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

from sqlalchemy import Integer, Row, case, delete, literal, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import identity
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.util import identity_key
from sqlalchemy.sql.elements import ColumnElement

from bot.credits import CreditReport, InsufficientCredits, QuotaDefaults, _period, _utc, period_bounds
from bot.models import CreditEntry, Guild, LedgerKind, Member, UTCDateTime, utcnow
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

_members = Member.__table__
_guilds = Guild.__table__
_ledger = CreditEntry.__table__
_NOTE_MAX = 200
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


def _least(a: ColumnElement[Any], b: ColumnElement[Any]) -> ColumnElement[Any]:
    # CASE instead of LEAST()/min(): PostgreSQL and SQLite spell those differently.
    return case((a < b, a), else_=b)


def _greatest(a: ColumnElement[Any], b: ColumnElement[Any]) -> ColumnElement[Any]:
    return case((a > b, a), else_=b)


def _int(value: int) -> ColumnElement[int]:
    return literal(value, Integer)


def _insert(session: AsyncSession, table: Any) -> Any:
    """A dialect INSERT, so ON CONFLICT is available on both backends."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return pg_insert(table)
    if dialect == "sqlite":
        return sqlite_insert(table)
    raise NotImplementedError(f"quota needs PostgreSQL or SQLite, not {dialect}")


def _sync_member(session: AsyncSession, member_id: int, **values: Any) -> None:
    """Bring an already-loaded Member up to date without marking it dirty."""
    identity_map: identity.IdentityMap = session.identity_map
    member = identity_map.get(identity_key(Member, member_id))
    if member is not None:
        for name, value in values.items():
            set_committed_value(member, name, value)


async def _account(session: AsyncSession, member_id: int) -> Row[Any]:
    """The member's and their guild's limit/period, with usage, bonus and period start.

    Columns: member limit, member period, guild limit, guild period, credits used, bonus
    credits, period start. Raises ``LookupError`` for an unknown member.
    """
    row = (
        await session.execute(
            select(
                _members.c.credit_limit,
                _members.c.credit_period,
                _guilds.c.credit_limit,
                _guilds.c.credit_period,
                _members.c.credits_used,
                _members.c.bonus_credits,
                _members.c.period_start,
            )
            .select_from(_members.outerjoin(_guilds, _guilds.c.id == _members.c.guild_id))
            .where(_members.c.id == member_id)
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
        _insert(session, _guilds)
        .values(id=guild_id, name="", created_at=now)
        .on_conflict_do_nothing(index_elements=["id"])
    )
    await session.execute(
        _insert(session, _members)
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
            update(_members)
            .where(
                _members.c.guild_id == guild_id,
                _members.c.user_id == user_id,
                _members.c.display_name != display_name,
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
    stale = _members.c.period_start.is_(None) | (_members.c.period_start < start_value)
    before = (
        await session.execute(
            update(_members)
            .where(_members.c.id == member_id)
            .values(
                credits_used=case((stale, _int(0)), else_=_members.c.credits_used),
                period_start=case((stale, start_value), else_=_members.c.period_start),
            )
            .returning(_members.c.credits_used, _members.c.bonus_credits, _members.c.period_start)
        )
    ).one_or_none()
    if before is None:
        raise LookupError(f"no member with id {member_id}")
    used_before, bonus_before, period_start = before
    _sync_member(session, member_id, credits_used=used_before, period_start=period_start)

    # The ledger key is the idempotency guard: a job already reserved inserts nothing here.
    entry_id = (
        await session.execute(
            _insert(session, _ledger)
            .values(
                member_id=member_id,
                job_id=job_id,
                kind=LedgerKind.RESERVE.value,
                amount=cost,
                note="",
                created_at=now,
            )
            .on_conflict_do_nothing(index_elements=["job_id", "kind"])
            .returning(_ledger.c.id)
        )
    ).scalar_one_or_none()
    if entry_id is None:
        return

    from_allowance, from_bonus = 0, 0
    if cost > 0:
        used, bonus = _members.c.credits_used, _members.c.bonus_credits
        allowance_left = _greatest(_int(eff.limit) - used, _int(0))
        take = _least(allowance_left, _int(cost))
        spent = (
            await session.execute(
                update(_members)
                .where(_members.c.id == member_id, allowance_left + bonus >= _int(cost))
                .values(credits_used=used + take, bonus_credits=bonus - (_int(cost) - take))
                .returning(_members.c.credits_used, _members.c.bonus_credits)
            )
        ).one_or_none()
        if spent is None:
            await session.execute(delete(_ledger).where(_ledger.c.id == entry_id))
            remaining = max(eff.limit - used_before, 0) + bonus_before
            raise InsufficientCredits(cost=cost, remaining=remaining, resets_at=end)
        used_after, bonus_after = spent
        from_allowance, from_bonus = used_after - used_before, bonus_before - bonus_after
        if from_allowance + from_bonus != cost:  # only if the row changed under us: a locking bug
            raise RuntimeError(f"credit row for member {member_id} changed during reserve of job {job_id}")
        _sync_member(session, member_id, credits_used=used_after, bonus_credits=bonus_after)

    await session.execute(
        update(_ledger)
        .where(_ledger.c.id == entry_id)
        .values(note=f"allowance={from_allowance} bonus={from_bonus}")
    )


async def refund(session: AsyncSession, job_id: str, now: datetime | None = None) -> bool:
    """Give back what ``job_id`` reserved, exactly once.

    Returns True when this call refunded, False when the job was never reserved or was already
    refunded (also when another transaction refunds it concurrently: the UNIQUE(job_id, kind)
    insert decides). Allowance credits go back to the current usage, never below 0 (after a
    period reset or an admin reset there may be nothing left to give back); bonus credits go back
    to the bonus balance. Does not commit.
    """
    now = _utc(now)
    reserved = (
        await session.execute(
            select(_ledger.c.member_id, _ledger.c.amount, _ledger.c.note).where(
                _ledger.c.job_id == job_id, _ledger.c.kind == LedgerKind.RESERVE.value
            )
        )
    ).one_or_none()
    if reserved is None:
        return False
    member_id, amount, note = reserved
    split = _SPLIT_RE.search(note or "")
    from_allowance, from_bonus = (int(split[1]), int(split[2])) if split else (amount, 0)

    entry_id = (
        await session.execute(
            _insert(session, _ledger)
            .values(
                member_id=member_id,
                job_id=job_id,
                kind=LedgerKind.REFUND.value,
                amount=-(from_allowance + from_bonus),
                note=f"allowance={from_allowance} bonus={from_bonus}",
                created_at=now,
            )
            .on_conflict_do_nothing(index_elements=["job_id", "kind"])
            .returning(_ledger.c.id)
        )
    ).scalar_one_or_none()
    if entry_id is None:
        return False

    used = _members.c.credits_used
    after = (
        await session.execute(
            update(_members)
            .where(_members.c.id == member_id)
            .values(
                credits_used=_greatest(used - _int(from_allowance), _int(0)),
                bonus_credits=_members.c.bonus_credits + _int(from_bonus),
            )
            .returning(_members.c.credits_used, _members.c.bonus_credits)
        )
    ).one_or_none()
    if after is not None:
        _sync_member(session, member_id, credits_used=after[0], bonus_credits=after[1])
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
