"""A job's stored pictures as its worker message carries them.

``bot.inputs`` stores the pictures a member gives (``/imagine``'s attachment and links,
``/blend``'s images, ``/describe``'s picture) and lists them per job in ``job_inputs`` by the
bot's role names. :func:`request_inputs` turns them into ``JobRequest`` fields: ``references``
under ``workers.schema.ReferenceRole`` names, or for ``/describe`` the ``input_image``. A 🔄 on a
blend has no pictures of its own: it blends its parent's again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.inputs import load_references
from bot.models import Job
from bot.storage import MediaStore
from workers.schema import JobKind, ReferenceRole

# bot.inputs' role names → the worker message's. "image" is the pictures before the prompt's
# text (and /blend's): the worker's image prompts.
REFERENCE_ROLES: dict[str, ReferenceRole] = {
    "image": ReferenceRole.PROMPT,
    "style": ReferenceRole.STYLE,
    "character": ReferenceRole.CHARACTER,
    "omni": ReferenceRole.OMNI,
}
IMAGE_ROLE = "image"  # the role /blend's and /describe's pictures are stored under


@dataclass(frozen=True, slots=True)
class RequestInputs:
    """What a job's stored pictures add to its worker message."""

    kind: JobKind
    references: dict[str, list[str]] = field(default_factory=dict)
    input_image: str | None = None


async def request_inputs(
    sessions: async_sessionmaker[AsyncSession], store: MediaStore, job: Job, kind: JobKind
) -> RequestInputs:
    """The worker message fields from ``job``'s pictures (a blend's reroll uses its parent's).

    Raises ``MediaNotFound`` when a stored picture is gone: the job cannot run without it.
    """
    async with sessions() as session:
        stored = await load_references(session, store, job.id)
        if not stored and kind == JobKind.REROLL and job.parent_id:
            parent = await session.get(Job, job.parent_id)
            if parent is not None and parent.kind == JobKind.BLEND.value:
                kind = JobKind.BLEND
                stored = await load_references(session, store, parent.id)
    references: dict[str, list[str]] = {}
    for role, pictures in stored.items():
        name = REFERENCE_ROLES[role].value if role in REFERENCE_ROLES else role
        references.setdefault(name, []).extend(pictures)
    if kind == JobKind.DESCRIBE:
        pictures = references.pop(ReferenceRole.PROMPT.value, [])
        return RequestInputs(kind=kind, references=references, input_image=pictures[0] if pictures else None)
    return RequestInputs(kind=kind, references=references)
