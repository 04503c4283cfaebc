"""Helpers for the credit tests: a member, a reservation in its own transaction, reports, the ledger."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.credits import CreditReport, InsufficientCredits, QuotaDefaults
from bot.models import CreditEntry, LedgerKind
from bot.quota import get_or_create_member, report, reserve
from bot.settings import Period

Sessions = async_sessionmaker[AsyncSession]

GUILD = 1000
USER = 42
# A Wednesday in the middle of a month, so day, week and month boundaries all differ.
NOW = datetime(2024, 5, 15, 13, 30, tzinfo=UTC)
DAILY = QuotaDefaults(limit=5, period=Period.DAY)


async def new_member(sessions: Sessions, guild_id: int = GUILD, user_id: int = USER) -> int:
    """A member of the test guild, created in its own transaction."""
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
    """The member's credit report at ``now``."""
    async with sessions() as session:
        return await report(session, member_id, defaults, now=now)


async def ledger(sessions: Sessions, kind: LedgerKind | None = None) -> list[CreditEntry]:
    """Ledger entries (of one kind), oldest first."""
    async with sessions() as session:
        query = select(CreditEntry).order_by(CreditEntry.id)
        if kind is not None:
            query = query.where(CreditEntry.kind == kind.value)
        return list((await session.execute(query)).scalars())
