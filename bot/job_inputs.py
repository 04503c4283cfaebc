"""The pictures a member gave a job (``/blend``'s images, ``/describe``'s picture), stored and read.

A picture is stored once in the media store under ``inputs/<random id>.png`` (already cleaned by
``bot.imagefetch``: PNG, no metadata) before the job exists, so the job row, its charge and its
``job_inputs`` rows are one transaction; a refused job leaves only an unreferenced file. The rows
name the picture's role (``workers.schema.ReferenceRole`` values) and its order.

When a job goes to a worker, :func:`request_inputs` turns its rows into the message fields: the
``references`` by role, or for ``/describe`` the ``input_image``. A 🔄 on a blend has no pictures
of its own: it blends its parent's again.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.imagefetch import FetchedImage
from bot.models import Job, JobInput
from bot.storage import MediaStore
from workers.schema import JobKind, ReferenceRole


@dataclass(frozen=True, slots=True)
class StoredInput:
    """A picture already in the media store, waiting to be attached to a job."""

    role: str
    key: str


@dataclass(frozen=True, slots=True)
class RequestInputs:
    """What a job's stored pictures add to its worker message."""

    kind: JobKind
    references: dict[str, list[str]] = field(default_factory=dict)
    input_image: str | None = None


def input_key() -> str:
    """A fresh, unguessable media key for one input picture."""
    return f"inputs/{secrets.token_urlsafe(12)}.png"


async def store_inputs(
    store: MediaStore, images: Sequence[FetchedImage], role: ReferenceRole = ReferenceRole.PROMPT
) -> list[StoredInput]:
    """Put cleaned pictures in the media store; attach them with :func:`add_input_rows`."""
    stored = []
    for image in images:
        key = input_key()
        await store.put(key, image.data, "image/png")
        stored.append(StoredInput(role=role.value, key=key))
    return stored


async def add_input_rows(session: AsyncSession, job_id: str, inputs: Sequence[StoredInput]) -> None:
    """In the caller's transaction: the ``job_inputs`` rows of a new job, numbered per role."""
    counts: dict[str, int] = {}
    for item in inputs:
        counts[item.role] = counts.get(item.role, 0) + 1
        session.add(JobInput(job_id=job_id, role=item.role, index=counts[item.role], key=item.key))
    await session.flush()


async def input_rows(session: AsyncSession, job_id: str) -> list[JobInput]:
    """A job's input rows, by role and then in the order the member gave them."""
    return list(
        await session.scalars(
            select(JobInput).where(JobInput.job_id == job_id).order_by(JobInput.role, JobInput.index)
        )
    )


async def stored_inputs(sessions: async_sessionmaker[AsyncSession], job_id: str) -> list[StoredInput]:
    """A job's pictures as :class:`StoredInput` (to give a new job the same ones: 🔄)."""
    async with sessions() as session:
        return [StoredInput(role=row.role, key=row.key) for row in await input_rows(session, job_id)]


async def request_inputs(
    sessions: async_sessionmaker[AsyncSession], store: MediaStore, job: Job, kind: JobKind
) -> RequestInputs:
    """The worker message fields from ``job``'s pictures (a blend's reroll uses its parent's).

    Raises ``MediaNotFound`` when a stored picture is gone: the job cannot run without it.
    """
    async with sessions() as session:
        rows = await input_rows(session, job.id)
        if not rows and kind == JobKind.REROLL and job.parent_id:
            parent = await session.get(Job, job.parent_id)
            if parent is not None and parent.kind == JobKind.BLEND.value:
                kind = JobKind.BLEND
                rows = await input_rows(session, parent.id)
    references: dict[str, list[str]] = {}
    for row in rows:
        data = await store.get(row.key)
        references.setdefault(row.role, []).append(base64.b64encode(data).decode("ascii"))
    if kind == JobKind.DESCRIBE:
        pictures = references.pop(ReferenceRole.PROMPT.value, [])
        return RequestInputs(kind=kind, references=references, input_image=pictures[0] if pictures else None)
    return RequestInputs(kind=kind, references=references)
