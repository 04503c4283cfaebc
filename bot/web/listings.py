"""Listings of generation families: explore (newest), top (most favourited), search, a member's
creations, and a member's favourites. Fail-closed on visibility, like every gallery read.

A family is a shown job that heads it (no parent, or a parent that is not shown) and every shown
job below it, found by following ``parent_id`` down (see ``bot.web.queries.families``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Select, and_, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from bot.models import Favourite, Image, Job, Member
from bot.web import search
from bot.web.queries import (
    Thumb,
    cover_index,
    families,
    family_members,
    job_favourites,
    root_condition,
    shown,
)

FAMILY_PREVIEW = 8  # family members shown under an entry; the job page lists them all


class Order(StrEnum):
    """How a listing is sorted."""

    NEW = "new"  # newest families first
    TOP = "top"  # most favourited families first; families nobody favourited are left out


@dataclass(frozen=True, slots=True)
class Entry:
    """One card of a listing: a family's root job, its cover and the rest of the family."""

    job_id: str
    prompt: str
    params: dict[str, Any]
    seed: int
    kind: str
    created_at: datetime
    cover_index: int
    width: int
    height: int
    member_name: str
    member_public_id: str
    favourites: int
    family: list[Thumb] = field(default_factory=list)
    family_size: int = 0  # members besides the root, of which ``family`` holds the first few


@dataclass(frozen=True, slots=True)
class Page:
    """One page of entries, and whether another page follows."""

    entries: list[Entry]
    number: int
    has_next: bool


def _entry_select() -> Select[Any]:
    cover = cover_index()
    return (
        select(
            Job.id,
            Job.prompt,
            Job.params,
            Job.seed,
            Job.kind,
            Job.created_at,
            cover.label("cover_index"),
            Image.width,
            Image.height,
            Member.display_name,
            Member.public_id,
        )
        .join(Member, Member.id == Job.member_id)
        .join(Image, and_(Image.job_id == Job.id, Image.index == cover))
    )


async def entries_page(
    session: AsyncSession,
    page: int,
    page_size: int,
    *,
    order: Order = Order.NEW,
    member_id: int | None = None,
    query: str = "",
) -> Page:
    """Page ``page`` (1-based) of families, filtered by owner and/or a search ``query``.

    A search finds a family when any of its shown jobs matches, and an empty result (not every
    family) when the query has nothing searchable in it.
    """
    stmt = _entry_select().where(root_condition())
    if member_id is not None:
        stmt = stmt.where(Job.member_id == member_id)
    if query:
        condition = await search.matching(session, query)
        if condition is None:
            return Page(entries=[], number=page, has_next=False)
        family = families(name="matched_family")
        matched = select(family.c.root_id).join(Job, Job.id == family.c.job_id).where(condition)
        stmt = stmt.where(Job.id.in_(matched))
    if order is Order.TOP:
        family = families(name="top_family")
        counts = (
            select(family.c.root_id.label("root_id"), func.count(Favourite.id).label("n"))
            .join(Favourite, Favourite.job_id == family.c.job_id)
            .group_by(family.c.root_id)
            .subquery()
        )
        stmt = stmt.join(counts, counts.c.root_id == Job.id).order_by(
            counts.c.n.desc(), Job.created_at.desc(), Job.id.desc()
        )
    else:
        stmt = stmt.order_by(Job.created_at.desc(), Job.id.desc())
    # One extra row says whether there is a next page without a COUNT over the table.
    rows = (await session.execute(stmt.limit(page_size + 1).offset((page - 1) * page_size))).all()
    shown_rows = rows[:page_size]
    members = await family_members(session, [row.id for row in shown_rows])
    counts_by_root = await _family_favourites(session, [row.id for row in shown_rows])
    entries = [_entry(row, counts_by_root.get(row.id, 0), members.get(row.id, [])) for row in shown_rows]
    return Page(entries=entries, number=page, has_next=len(rows) > page_size)


def _entry(row: Any, favourites: int, family: list[Thumb] | None = None) -> Entry:
    """A card from a row of :func:`_entry_select`, with its favourites and family members."""
    members = family or []
    return Entry(
        job_id=row.id,
        prompt=row.prompt or "",
        params=row.params if isinstance(row.params, dict) else {},
        seed=row.seed,
        kind=row.kind,
        created_at=row.created_at,
        cover_index=row.cover_index,
        width=row.width,
        height=row.height,
        member_name=row.display_name or "",
        member_public_id=row.public_id,
        favourites=favourites,
        family=members[:FAMILY_PREVIEW],
        family_size=len(members),
    )


async def _family_favourites(session: AsyncSession, root_ids: list[str]) -> dict[str, int]:
    """Favourites on the shown jobs of each family, summed per family."""
    if not root_ids:
        return {}
    family = families(select(Job.id).where(Job.id.in_(root_ids)))
    rows = (
        await session.execute(
            select(family.c.root_id, func.count(Favourite.id))
            .join(Favourite, Favourite.job_id == family.c.job_id)
            .group_by(family.c.root_id)
        )
    ).all()
    return {root_id: int(count) for root_id, count in rows}


async def favourites_page(session: AsyncSession, member_id: int, page: int, page_size: int) -> Page:
    """The shown jobs a member favourited, most recently favourited first, one entry each."""
    stmt = (
        _entry_select()
        .join(Favourite, Favourite.job_id == Job.id)
        .where(Favourite.member_id == member_id, *shown())
        .order_by(Favourite.created_at.desc(), Favourite.id.desc())
        .limit(page_size + 1)
        .offset((page - 1) * page_size)
    )
    rows = (await session.execute(stmt)).all()
    shown_rows = rows[:page_size]
    counts = await job_favourites(session, [row.id for row in shown_rows])
    entries = [_entry(row, counts.get(row.id, 0)) for row in shown_rows]
    return Page(entries=entries, number=page, has_next=len(rows) > page_size)
