"""The gallery's database reads. Every query here is fail-closed on visibility.

A job is shown only when its visibility is exactly "public" and it finished ("done"). Anything
else (stealth, a missing or unexpected value, a job still running or one that failed) is treated
as if it did not exist, and the results are plain dataclasses so no template can lazy-load a
relationship and wander into hidden rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from bot.models import Image, Job, JobStatus, Member
from workers.schema import Visibility


def _shown() -> tuple[ColumnElement[bool], ...]:
    """The one definition of "may appear in the gallery"."""
    return (Job.visibility == Visibility.PUBLIC.value, Job.status == JobStatus.DONE.value)


@dataclass(frozen=True, slots=True)
class Tile:
    """One job in a feed or member page."""

    job_id: str
    prompt: str
    kind: str
    created_at: datetime
    cover_index: int
    member_name: str
    member_public_id: str


@dataclass(frozen=True, slots=True)
class Page:
    """One page of tiles, and whether an older page follows."""

    tiles: list[Tile]
    number: int
    has_next: bool


@dataclass(frozen=True, slots=True)
class MemberView:
    """What the gallery shows of a member."""

    public_id: str
    display_name: str


@dataclass(frozen=True, slots=True)
class ImageView:
    """One stored image of a shown job."""

    index: int
    key: str
    width: int
    height: int
    content_type: str

    @property
    def ext(self) -> str:
        """The file extension of the stored object (png, jpg, webp)."""
        return self.key.rsplit(".", 1)[-1]


@dataclass(frozen=True, slots=True)
class ParentView:
    """A parent job, present only when it may itself be shown."""

    job_id: str
    prompt: str
    cover_index: int | None


@dataclass(frozen=True, slots=True)
class JobView:
    """Everything the job page shows."""

    job_id: str
    kind: str
    prompt: str
    params: dict[str, Any]
    seed: int
    engine: str
    created_at: datetime
    finished_at: datetime | None
    parent_index: int | None
    member: MemberView
    parent: ParentView | None
    images: list[ImageView] = field(default_factory=list)


def _cover_index() -> Any:
    # The grid (index 0) when there is one, else the first stored image: the tile a job shows.
    return select(func.min(Image.index)).where(Image.job_id == Job.id).correlate(Job).scalar_subquery()


async def tiles_page(
    session: AsyncSession, page: int, page_size: int, *, member_id: int | None = None
) -> Page:
    """Page ``page`` (1-based) of shown jobs with at least one image, newest first."""
    cover = _cover_index()
    stmt = (
        select(
            Job.id,
            Job.prompt,
            Job.kind,
            Job.created_at,
            cover.label("cover_index"),
            Member.display_name,
            Member.public_id,
        )
        .join(Member, Member.id == Job.member_id)
        .where(*_shown(), cover.is_not(None))
        .order_by(Job.created_at.desc(), Job.id.desc())
        # One extra row says whether there is a next page without a COUNT over the table.
        .limit(page_size + 1)
        .offset((page - 1) * page_size)
    )
    if member_id is not None:
        stmt = stmt.where(Job.member_id == member_id)
    rows = (await session.execute(stmt)).all()
    tiles = [
        Tile(
            job_id=row.id,
            prompt=row.prompt or "",
            kind=row.kind,
            created_at=row.created_at,
            cover_index=row.cover_index,
            member_name=row.display_name or "",
            member_public_id=row.public_id,
        )
        for row in rows[:page_size]
    ]
    return Page(tiles=tiles, number=page, has_next=len(rows) > page_size)


async def member_by_public_id(session: AsyncSession, public_id: str) -> tuple[int, MemberView] | None:
    """The member with this public id (its row id for further queries, and its view)."""
    row = (
        await session.execute(
            select(Member.id, Member.public_id, Member.display_name).where(Member.public_id == public_id)
        )
    ).first()
    if row is None:
        return None
    return row.id, MemberView(public_id=row.public_id, display_name=row.display_name or "")


async def job_view(session: AsyncSession, job_id: str) -> JobView | None:
    """The job page's data, or None when the job is missing or may not be shown."""
    row = (
        await session.execute(
            select(Job, Member.public_id, Member.display_name)
            .join(Member, Member.id == Job.member_id)
            .where(Job.id == job_id, *_shown())
        )
    ).first()
    if row is None:
        return None
    job: Job = row[0]
    images = [
        ImageView(index=i.index, key=i.key, width=i.width, height=i.height, content_type=i.content_type)
        for i in (
            await session.scalars(select(Image).where(Image.job_id == job.id).order_by(Image.index))
        ).all()
    ]
    parent: ParentView | None = None
    if job.parent_id:
        # The parent goes through the same filter: a stealth parent is simply not there.
        prow = (
            await session.execute(
                select(Job.id, Job.prompt, _cover_index().label("cover_index")).where(
                    Job.id == job.parent_id, *_shown()
                )
            )
        ).first()
        if prow is not None:
            parent = ParentView(job_id=prow.id, prompt=prow.prompt or "", cover_index=prow.cover_index)
    return JobView(
        job_id=job.id,
        kind=job.kind,
        prompt=job.prompt or "",
        params=job.params if isinstance(job.params, dict) else {},
        seed=job.seed,
        engine=job.engine,
        created_at=job.created_at,
        finished_at=job.finished_at,
        # Which of the parent's images this came from means nothing without the parent.
        parent_index=job.parent_index if parent is not None else None,
        member=MemberView(public_id=row.public_id, display_name=row.display_name or ""),
        parent=parent,
        images=images,
    )


async def shown_image(session: AsyncSession, job_id: str, index: int) -> ImageView | None:
    """Image ``index`` of a shown job, or None."""
    image = (
        await session.scalars(
            select(Image)
            .join(Job, Job.id == Image.job_id)
            .where(Image.job_id == job_id, Image.index == index, *_shown())
        )
    ).first()
    if image is None:
        return None
    return ImageView(
        index=image.index,
        key=image.key,
        width=image.width,
        height=image.height,
        content_type=image.content_type,
    )
