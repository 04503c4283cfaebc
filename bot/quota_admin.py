"""Credits administration: member and server allowances, grants and usage resets.

The same rules as ``bot.quota`` hold: statements run in the caller's transaction, every change
to a member's credits is one conditional UPDATE, grants and resets are written to the ledger,
and a ``Member``/``Guild`` already loaded in the session is updated in place.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.util import identity_key

from bot.credits import QuotaDefaults, _utc, period_bounds
from bot.models import Guild, LedgerKind, utcnow
from bot.quota import _account, _effective
from bot.quota_sql import GUILDS, LEDGER, MEMBERS, NOTE_MAX, dialect_insert, int_param, sync_member
from bot.settings import Period

__all__ = ["MAX_CREDITS", "grant", "reset_usage", "set_guild_default", "set_member_limit"]

# The most a limit or a bonus balance may be. Credits are 32-bit integers on PostgreSQL
# (2,147,483,647 at most); staying well below leaves room for refunds that add back to a balance.
MAX_CREDITS = 1_000_000_000


def _check_limit(limit: int | None) -> None:
    if limit is None:
        return
    if limit < 0:
        raise ValueError("limit must not be negative")
    if limit > MAX_CREDITS:
        raise ValueError(f"limit must be at most {MAX_CREDITS}")


async def set_member_limit(
    session: AsyncSession, member_id: int, limit: int | None, period: Period | None
) -> None:
    """Set the member's own allowance and period; None for either falls back to the guild's.

    Usage so far is kept. Raises ``LookupError`` for an unknown member, ``ValueError`` for a
    negative limit or one above :data:`MAX_CREDITS`.
    """
    _check_limit(limit)
    period_value = Period(period).value if period is not None else None
    result = await session.execute(
        update(MEMBERS)
        .where(MEMBERS.c.id == member_id)
        .values(credit_limit=limit, credit_period=period_value)
        .returning(MEMBERS.c.id)
    )
    if result.scalar_one_or_none() is None:
        raise LookupError(f"no member with id {member_id}")
    sync_member(session, member_id, credit_limit=limit, credit_period=period_value)


async def grant(session: AsyncSession, member_id: int, amount: int, actor_id: int, note: str = "") -> int:
    """Add ``amount`` bonus credits (they survive period resets); returns the new bonus balance.

    A negative amount takes granted credits back; it must not exceed the bonus balance, and the
    balance must stay at most :data:`MAX_CREDITS`. Raises ``LookupError`` for an unknown member,
    ``ValueError`` for 0, for taking back too much or for granting too much.
    """
    if amount == 0:
        raise ValueError("amount must not be 0")
    if abs(amount) > MAX_CREDITS:  # also keeps the bound parameter inside a 32-bit integer
        raise ValueError(f"a grant is at most {MAX_CREDITS} credits")
    bonus = MEMBERS.c.bonus_credits
    new_value = bonus + int_param(amount)
    new_bonus = (
        await session.execute(
            update(MEMBERS)
            .where(
                MEMBERS.c.id == member_id,
                new_value >= int_param(0),
                new_value <= int_param(MAX_CREDITS),
            )
            .values(bonus_credits=new_value)
            .returning(bonus)
        )
    ).scalar_one_or_none()
    if new_bonus is None:
        current = (await session.execute(select(bonus).where(MEMBERS.c.id == member_id))).scalar_one_or_none()
        if current is None:
            raise LookupError(f"no member with id {member_id}")
        if amount > 0:
            raise ValueError(
                f"a member holds at most {MAX_CREDITS} granted credits and this one has {current}"
            )
        raise ValueError(f"cannot take back {-amount} credits: the member has {current} granted credits")
    await session.execute(
        LEDGER.insert().values(
            member_id=member_id,
            job_id=None,
            kind=LedgerKind.GRANT.value,
            amount=-amount,  # ledger sign: positive spends, negative gives
            actor_id=actor_id,
            note=note[:NOTE_MAX],
            created_at=utcnow(),
        )
    )
    sync_member(session, member_id, bonus_credits=new_bonus)
    return new_bonus


async def reset_usage(
    session: AsyncSession,
    member_id: int,
    actor_id: int,
    defaults: QuotaDefaults,
    now: datetime | None = None,
) -> int:
    """Clear the member's usage in the current period; bonus credits are untouched.

    Usage counts again from ``now``: a job charged before the reset and refunded after it gives
    back only its bonus part (``bot.quota.refund``), since the reset already forgave the rest.
    Returns the number of allowance credits cleared (recorded in the ledger): usage left over
    from an expired period counts as none. Raises ``LookupError`` for an unknown member.
    """
    now = _utc(now)
    account = await _account(session, member_id)
    start, _end = period_bounds(now, _effective(*account[:4], defaults).period)
    used = MEMBERS.c.credits_used
    # Pin the row first (row lock on PostgreSQL) so the amount cleared is exactly what was used.
    row = (
        await session.execute(
            update(MEMBERS)
            .where(MEMBERS.c.id == member_id)
            .values(credits_used=used)
            .returning(MEMBERS.c.credits_used, MEMBERS.c.period_start)
        )
    ).one_or_none()
    if row is None:
        raise LookupError(f"no member with id {member_id}")
    used_before, period_start = row
    cleared = used_before if period_start is not None and period_start >= start else 0
    # Moving period_start to the reset instant marks earlier charges as belonging to usage that
    # is gone: a refund of one must not take credits off the usage counted since the reset.
    await session.execute(
        update(MEMBERS).where(MEMBERS.c.id == member_id).values(credits_used=0, period_start=now)
    )
    await session.execute(
        LEDGER.insert().values(
            member_id=member_id,
            job_id=None,
            kind=LedgerKind.RESET.value,
            amount=-cleared,
            actor_id=actor_id,
            note="",
            created_at=now,
        )
    )
    sync_member(session, member_id, credits_used=0, period_start=now)
    return cleared


async def set_guild_default(
    session: AsyncSession, guild_id: int, limit: int | None, period: Period | None
) -> None:
    """Set the guild's default allowance and period (None falls back to the bot's settings).

    Creates the guild row if needed. Raises ``ValueError`` for a negative limit or one above
    :data:`MAX_CREDITS`.
    """
    _check_limit(limit)
    period_value = Period(period).value if period is not None else None
    await session.execute(
        dialect_insert(session, GUILDS)
        .values(id=guild_id, name="", credit_limit=limit, credit_period=period_value, created_at=utcnow())
        .on_conflict_do_update(
            index_elements=["id"], set_={"credit_limit": limit, "credit_period": period_value}
        )
    )
    guild = session.identity_map.get(identity_key(Guild, guild_id))
    if guild is not None:
        set_committed_value(guild, "credit_limit", limit)
        set_committed_value(guild, "credit_period", period_value)
