"""A job's worker message (``JobRequest``), with every picture it needs read from the media store.

The parent's image (a tile or the single image) for follow-ups, a Vary (Region) mask, and the
pictures a member gave: ``bot.inputs`` stores them (``/imagine``'s attachment and links,
``/blend``'s images, ``/describe``'s picture) and lists them per job in ``job_inputs`` by the
bot's role names. :func:`request_inputs` turns those into ``references`` under
``workers.schema.ReferenceRole`` names, or for ``/describe`` the ``input_image``. A 🔄 on a blend
has no pictures of its own: it blends its parent's again.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.inputs import load_references
from bot.models import Job
from bot.operations import Operation, generation_params, grid_count
from bot.profiles import Prompting
from bot.results import Results
from bot.storage import MediaStore
from workers.schema import Engine, JobKind, JobRequest, ReferenceRole

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


async def build_request(
    job: Job,
    sessions: async_sessionmaker[AsyncSession],
    results: Results,
    prompting: Prompting,
    openai_model: str,
) -> JobRequest:
    """The worker message for a job, its pictures read from the media store.

    Raises ``MediaNotFound`` when an image it starts from is gone and ``ValueError`` when it is
    not a readable image.
    """
    operation = Operation.from_job(job)
    input_image = None
    if job.parent_id and operation.kind not in (JobKind.REROLL, JobKind.IMAGINE):
        data = await results.input_image(job.parent_id, job.parent_index)
        input_image = base64.b64encode(data).decode("ascii")
    inputs = await request_inputs(sessions, results.store, job, operation.kind)
    mask_image = None
    if operation.mask_key:
        mask_image = base64.b64encode(await results.store.get(operation.mask_key)).decode("ascii")
    return JobRequest(
        job_id=job.id,
        kind=inputs.kind,
        params=prompting.prepare(generation_params(job)),
        seed=job.seed,
        count=grid_count(operation.kind),
        strength=operation.strength,
        scale=operation.scale,
        direction=operation.direction,
        input_image=input_image or inputs.input_image,
        references=inputs.references,
        mask_image=mask_image,
        openai_model=openai_model if job.engine == Engine.OPENAI.value else None,
    )
