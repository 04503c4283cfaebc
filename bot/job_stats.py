"""Job counts for ``/info`` and ``/status``: read-only queries over the jobs table."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.lifecycle import PENDING, values_of
from bot.models import Job
from workers.schema import JobKind

PENDING_STATUSES = values_of(PENDING)


async def member_counts(sessions: async_sessionmaker[AsyncSession], member_id: int) -> dict[str, int]:
    """The member's jobs per pending status."""
    async with sessions() as session:
        rows = await session.execute(
            select(Job.status, func.count())
            .where(Job.member_id == member_id, Job.status.in_(PENDING_STATUSES))
            .group_by(Job.status)
        )
        return {status: n for status, n in rows.all()}


async def status_counts(sessions: async_sessionmaker[AsyncSession], since: datetime) -> dict[str, Any]:
    """Counts for ``/status``: pending jobs per status and engine, and the last hour's results."""
    async with sessions() as session:
        pending = (
            await session.execute(
                select(Job.engine, Job.status, func.count())
                .where(Job.status.in_(PENDING_STATUSES), Job.kind != JobKind.CROP.value)
                .group_by(Job.engine, Job.status)
            )
        ).all()
        recent = (
            await session.execute(
                select(Job.status, func.count()).where(Job.created_at >= since).group_by(Job.status)
            )
        ).all()
    return {
        "pending": {(engine, status): n for engine, status, n in pending},
        "recent": {status: n for status, n in recent},
    }
