"""Favourites (❤️): one per member and job, toggled from Discord and counted by the gallery."""

from __future__ import annotations

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from bot.models import Favourite, Job


async def toggle_favourite(session: AsyncSession, member_id: int, job_id: str) -> bool:
    """Favourite ``job_id`` for the member with row id ``member_id``, or unfavourite it.

    Returns whether the job is a favourite afterwards. Raises ``LookupError`` when the job does
    not exist. Flushes but does not commit: the caller owns the transaction.
    """
    if await session.scalar(select(Job.id).where(Job.id == job_id)) is None:
        raise LookupError(f"no job {job_id!r}")
    removed = await session.execute(
        delete(Favourite).where(Favourite.member_id == member_id, Favourite.job_id == job_id)
    )
    if removed.rowcount:  # type: ignore[attr-defined]
        return False
    try:
        async with session.begin_nested():
            session.add(Favourite(member_id=member_id, job_id=job_id))
    except IntegrityError:
        # A second press racing this one added the row first: the job is a favourite either way.
        return True
    return True


async def is_favourite(session: AsyncSession, member_id: int, job_id: str) -> bool:
    """Whether the member has favourited the job."""
    found = await session.scalar(
        select(Favourite.id).where(Favourite.member_id == member_id, Favourite.job_id == job_id)
    )
    return found is not None


async def favourite_count(session: AsyncSession, job_id: str) -> int:
    """How many members favourited the job."""
    return int(await session.scalar(select(func.count()).where(Favourite.job_id == job_id)) or 0)
