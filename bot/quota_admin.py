"""Credits administration: member and server allowances, grants and usage resets.

The same rules as ``bot.quota`` hold: statements run in the caller's transaction, every change
to a member's credits is one conditional UPDATE, grants and resets are written to the ledger,
and a ``Member``/``Guild`` already loaded in the session is updated in place.
"""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.util import identity_key

from bot.models import Guild, LedgerKind, utcnow
from bot.quota_sql import GUILDS, LEDGER, MEMBERS, NOTE_MAX, dialect_insert, int_param, sync_member
from bot.settings import Period

__all__ = ["grant", "reset_usage", "set_guild_default", "set_member_limit"]


async def set_member_limit(
    session: AsyncSession, member_id: int, limit: int | None, period: Period | None
) -> None:
    """Set the member's own allowance and period; None for either falls back to the guild's.

    Usage so far is kept. Raises ``LookupError`` for an unknown member, ``ValueError`` for a
    negative limit.
    """
    if limit is not None and limit < 0:
        raise ValueError("limit must not be negative")
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

    A negative amount takes granted credits back; it must not exceed the bonus balance. Raises
    ``LookupError`` for an unknown member, ``ValueError`` for 0 or for taking back too much.
    """
    if amount == 0:
        raise ValueError("amount must not be 0")
    bonus = MEMBERS.c.bonus_credits
    new_bonus = (
        await session.execute(
            update(MEMBERS)
            .where(MEMBERS.c.id == member_id, bonus + int_param(amount) >= int_param(0))
            .values(bonus_credits=bonus + int_param(amount))
            .returning(bonus)
        )
    ).scalar_one_or_none()
    if new_bonus is None:
        current = (await session.execute(select(bonus).where(MEMBERS.c.id == member_id))).scalar_one_or_none()
        if current is None:
            raise LookupError(f"no member with id {member_id}")
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


async def reset_usage(session: AsyncSession, member_id: int, actor_id: int) -> int:
    """Clear the member's usage in the current period; bonus credits are untouched.

    Returns the number of allowance credits cleared (recorded in the ledger). Raises
    ``LookupError`` for an unknown member.
    """
    used = MEMBERS.c.credits_used
    # Pin the row first (row lock on PostgreSQL) so the amount cleared is exactly what was used.
    row = (
        await session.execute(
            update(MEMBERS)
            .where(MEMBERS.c.id == member_id)
            .values(credits_used=used)
            .returning(MEMBERS.c.credits_used)
        )
    ).one_or_none()
    if row is None:
        raise LookupError(f"no member with id {member_id}")
    cleared = row[0]
    await session.execute(update(MEMBERS).where(MEMBERS.c.id == member_id).values(credits_used=0))
    await session.execute(
        LEDGER.insert().values(
            member_id=member_id,
            job_id=None,
            kind=LedgerKind.RESET.value,
            amount=-cleared,
            actor_id=actor_id,
            note="",
            created_at=utcnow(),
        )
    )
    sync_member(session, member_id, credits_used=0)
    return cleared


async def set_guild_default(
    session: AsyncSession, guild_id: int, limit: int | None, period: Period | None
) -> None:
    """Set the guild's default allowance and period (None falls back to the bot's settings).

    Creates the guild row if needed. Raises ``ValueError`` for a negative limit.
    """
    if limit is not None and limit < 0:
        raise ValueError("limit must not be negative")
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
