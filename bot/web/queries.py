"""The gallery's database reads. Every query here is fail-closed on visibility.

A job is shown only when its visibility is exactly "public" and it finished ("done"). Anything
else (stealth, a missing or unexpected value, a job still running or one that failed) is treated
as if it did not exist, and the results are plain dataclasses so no template can lazy-load a
relationship and wander into hidden rows.

Listings show generation *families*: a grid with the upscales, variations and edits made from it,
found by following ``parent_id``. A family's root is its topmost *shown* ancestor: the chain stops
at a hidden job, so a public child of a stealth grid heads a family of its own and nothing about
the hidden parent leaks into a listing.

The one exception to "shown only" is :func:`owned_job_view`, :func:`owned_image` and
:func:`owned_input`, which serve private links: those verify a signed token naming the owner
first (``bot.web.app``). A job's input pictures (``job_inputs``) follow their job's rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from bot.models import Favourite, Image, Job, JobInput, JobStatus, Member
from workers.schema import Visibility


def shown(job: Any = Job) -> tuple[ColumnElement[bool], ...]:
    """The one definition of "may appear in the gallery", for ``Job`` or an alias of it."""
    return (job.visibility == Visibility.PUBLIC.value, job.status == JobStatus.DONE.value)


@dataclass(frozen=True, slots=True)
class Thumb:
    """A family member under an entry: its page and cover picture."""

    job_id: str
    kind: str
    cover_index: int
    width: int
    height: int


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
class InputView:
    """A picture the member gave the job (a /blend image, a /describe picture, an image prompt)."""

    position: int  # 0-based, in the job's order: by role, then as the member gave them
    role: str
    key: str


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
    visibility: str
    created_at: datetime
    finished_at: datetime | None
    parent_index: int | None
    member: MemberView
    parent: ParentView | None
    favourites: int
    images: list[ImageView] = field(default_factory=list)
    family: list[Thumb] = field(default_factory=list)  # the shown family, root first, this job included
    inputs: list[InputView] = field(default_factory=list)


def cover_index(job: Any = Job) -> Any:
    """The index of the picture a job shows: the grid (0) when there is one, else its first image."""
    return select(func.min(Image.index)).where(Image.job_id == job.id).correlate(job).scalar_subquery()


def root_condition() -> ColumnElement[bool]:
    """Shown jobs that head a family: no parent, or a parent that is not shown."""
    parent = aliased(Job)
    shown_parent = select(parent.id).where(parent.id == Job.parent_id, *shown(parent)).exists()
    return and_(*shown(), ~shown_parent)


def families(roots: Select[Any] | None = None, name: str = "family") -> Any:
    """A recursive CTE of (job_id, root_id) for every shown job under the given (or every) root."""
    if roots is None:
        roots = select(Job.id).where(root_condition())
    base = select(Job.id.label("job_id"), Job.id.label("root_id")).where(Job.id.in_(roots))
    tree = base.cte(name, recursive=True)
    child = aliased(Job)
    # UNION (not UNION ALL) also ends the recursion should a parent_id cycle ever exist.
    return tree.union(
        select(child.id, tree.c.root_id).join(tree, child.parent_id == tree.c.job_id).where(*shown(child))
    )


async def family_members(session: AsyncSession, root_ids: list[str]) -> dict[str, list[Thumb]]:
    """The shown members (with a picture) of each family, oldest first, roots left out."""
    if not root_ids:
        return {}
    family = families(select(Job.id).where(Job.id.in_(root_ids)))
    cover = cover_index()
    rows = (
        await session.execute(
            select(family.c.root_id, Job.id, Job.kind, cover.label("cover_index"), Image.width, Image.height)
            .join(Job, Job.id == family.c.job_id)
            .join(Image, and_(Image.job_id == Job.id, Image.index == cover))
            .where(family.c.job_id != family.c.root_id)
            .order_by(Job.created_at, Job.id)
        )
    ).all()
    found: dict[str, list[Thumb]] = {}
    for row in rows:
        found.setdefault(row.root_id, []).append(
            Thumb(
                job_id=row.id, kind=row.kind, cover_index=row.cover_index, width=row.width, height=row.height
            )
        )
    return found


async def job_favourites(session: AsyncSession, job_ids: list[str]) -> dict[str, int]:
    """Favourites per job, for the given jobs (missing: none)."""
    if not job_ids:
        return {}
    rows = (
        await session.execute(
            select(Favourite.job_id, func.count(Favourite.id))
            .where(Favourite.job_id.in_(job_ids))
            .group_by(Favourite.job_id)
        )
    ).all()
    return {job_id: int(count) for job_id, count in rows}


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


async def _shown_root_of(session: AsyncSession, job_id: str) -> str:
    """The root of a shown job's family: walk up while the parent is shown."""
    seen = {job_id}
    current = job_id
    while True:
        parent_id = await session.scalar(select(Job.parent_id).where(Job.id == current))
        if parent_id is None or parent_id in seen:
            return current
        shown_parent = await session.scalar(select(Job.id).where(Job.id == parent_id, *shown()))
        if shown_parent is None:
            return current
        seen.add(parent_id)
        current = parent_id


async def _view(
    session: AsyncSession, job: Job, public_id: str, display_name: str, *, with_family: bool
) -> JobView:
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
                select(Job.id, Job.prompt, cover_index().label("cover_index")).where(
                    Job.id == job.parent_id, *shown()
                )
            )
        ).first()
        if prow is not None:
            parent = ParentView(job_id=prow.id, prompt=prow.prompt or "", cover_index=prow.cover_index)
    family: list[Thumb] = []
    if with_family:
        root_id = await _shown_root_of(session, job.id)
        root = (
            await session.execute(
                select(Job.id, Job.kind, cover_index().label("cover_index"), Image.width, Image.height)
                .join(Image, and_(Image.job_id == Job.id, Image.index == cover_index()))
                .where(Job.id == root_id)
            )
        ).first()
        members = (await family_members(session, [root_id])).get(root_id, [])
        if root is not None and members:
            family = [
                Thumb(root.id, root.kind, root.cover_index, root.width, root.height),
                *members,
            ]
    favourites = (await job_favourites(session, [job.id])).get(job.id, 0)
    return JobView(
        job_id=job.id,
        kind=job.kind,
        prompt=job.prompt or "",
        params=job.params if isinstance(job.params, dict) else {},
        seed=job.seed,
        engine=job.engine,
        visibility=job.visibility,
        created_at=job.created_at,
        finished_at=job.finished_at,
        # Which of the parent's images this came from means nothing without the parent.
        parent_index=job.parent_index if parent is not None else None,
        member=MemberView(public_id=public_id, display_name=display_name or ""),
        parent=parent,
        favourites=favourites,
        images=images,
        family=family,
        inputs=await job_inputs(session, job.id),
    )


async def job_view(session: AsyncSession, job_id: str) -> JobView | None:
    """The job page's data, or None when the job is missing or may not be shown."""
    row = (
        await session.execute(
            select(Job, Member.public_id, Member.display_name)
            .join(Member, Member.id == Job.member_id)
            .where(Job.id == job_id, *shown())
        )
    ).first()
    if row is None:
        return None
    return await _view(session, row[0], row.public_id, row.display_name, with_family=True)


async def owned_job_view(session: AsyncSession, job_id: str, user_id: int) -> JobView | None:
    """A finished job of the Discord user ``user_id``, whatever its visibility (private links)."""
    row = (
        await session.execute(
            select(Job, Member.public_id, Member.display_name)
            .join(Member, Member.id == Job.member_id)
            .where(Job.id == job_id, Job.user_id == user_id, Job.status == JobStatus.DONE.value)
        )
    ).first()
    if row is None:
        return None
    # A private page lists no family: the other jobs may be hidden, and are not this link's to show.
    return await _view(session, row[0], row.public_id, row.display_name, with_family=False)


def _image_view(image: Image) -> ImageView:
    return ImageView(
        index=image.index,
        key=image.key,
        width=image.width,
        height=image.height,
        content_type=image.content_type,
    )


async def shown_image(session: AsyncSession, job_id: str, index: int) -> ImageView | None:
    """Image ``index`` of a shown job, or None."""
    image = (
        await session.scalars(
            select(Image)
            .join(Job, Job.id == Image.job_id)
            .where(Image.job_id == job_id, Image.index == index, *shown())
        )
    ).first()
    return None if image is None else _image_view(image)


async def owned_image(session: AsyncSession, job_id: str, index: int, user_id: int) -> ImageView | None:
    """Image ``index`` of a finished job of ``user_id``, whatever its visibility, or None."""
    image = (
        await session.scalars(
            select(Image)
            .join(Job, Job.id == Image.job_id)
            .where(
                Image.job_id == job_id,
                Image.index == index,
                Job.user_id == user_id,
                Job.status == JobStatus.DONE.value,
            )
        )
    ).first()
    return None if image is None else _image_view(image)


async def job_inputs(session: AsyncSession, job_id: str) -> list[InputView]:
    """A job's input pictures in order (call only for a job the caller may show)."""
    rows = await session.scalars(
        select(JobInput).where(JobInput.job_id == job_id).order_by(JobInput.role, JobInput.index)
    )
    return [InputView(position=n, role=row.role, key=row.key) for n, row in enumerate(rows)]


async def shown_input(session: AsyncSession, job_id: str, position: int) -> InputView | None:
    """Input picture ``position`` of a shown job, or None."""
    if await session.scalar(select(Job.id).where(Job.id == job_id, *shown())) is None:
        return None
    inputs = await job_inputs(session, job_id)
    return inputs[position] if 0 <= position < len(inputs) else None


async def owned_input(session: AsyncSession, job_id: str, position: int, user_id: int) -> InputView | None:
    """Input picture ``position`` of a finished job of ``user_id``, whatever its visibility."""
    owned = select(Job.id).where(Job.id == job_id, Job.user_id == user_id, Job.status == JobStatus.DONE.value)
    if await session.scalar(owned) is None:
        return None
    inputs = await job_inputs(session, job_id)
    return inputs[position] if 0 <= position < len(inputs) else None
