"""Images a member gives a job: the ``/imagine`` attachment, image URLs, ``--sref/--cref/--oref``.

They are fetched and cleaned by ``bot.imagefetch`` before anything is charged, stored in the
media store as PNGs (``inputs/<batch>/<role>-<n>.png``) and listed per job in ``job_inputs``, so
the worker message can carry them (:func:`load_references`) and a restart loses nothing.

Roles: ``image`` (the attachment first, then the URLs at the start of the prompt), ``style``
(``--sref`` links), ``character`` (``--cref``), ``omni`` (``--oref``).
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from bot.imagefetch import FetchedImage, FetchLimits, fetch_references, read_attachment
from bot.models import JobInput
from bot.storage import MediaStore
from workers.schema import GenerationParams

if TYPE_CHECKING:
    import discord

ROLES = ("image", "style", "character", "omni")
InputKeys = dict[str, list[str]]


def has_references(params: GenerationParams) -> bool:
    """Whether the prompt points at any picture to fetch."""
    links = [ref for ref in params.style_refs if ref.lower().startswith(("http://", "https://"))]
    return bool(params.image_prompts or links or params.character_refs or params.omni_ref)


async def fetch_inputs(
    params: GenerationParams,
    attachment: discord.Attachment | None,
    limits: FetchLimits,
    allow_addresses: Sequence[str] = (),
) -> dict[str, list[FetchedImage]]:
    """Every picture of one prompt, by role; raises ``ImageInputError`` naming the image."""
    images: dict[str, list[FetchedImage]] = {role: [] for role in ROLES}
    if attachment is not None:
        images["image"].append(await read_attachment(attachment, 1, limits=limits))
    if has_references(params):
        # The attachment is image 1, so the prompt's links are numbered after it, as stored.
        refs = await fetch_references(
            params,
            limits=limits,
            allow_addresses=allow_addresses,
            first_image_index=len(images["image"]) + 1,
        )
        images["image"] += refs.prompt_images
        images["style"] += refs.style_images
        images["character"] += refs.character_images
        images["omni"] += refs.omni_images
    return {role: found for role, found in images.items() if found}


async def store_inputs(store: MediaStore, images: Mapping[str, Sequence[FetchedImage]]) -> InputKeys:
    """Put the pictures in the media store under a fresh batch; returns their keys by role."""
    batch = secrets.token_urlsafe(12)
    keys: InputKeys = {}
    for role, found in images.items():
        for index, image in enumerate(found):
            key = f"inputs/{batch}/{role}-{index}.png"
            await store.put(key, image.data, "image/png")
            keys.setdefault(role, []).append(key)
    return keys


def attach_inputs(session: AsyncSession, job_id: str, keys: Mapping[str, Sequence[str]]) -> None:
    """Record a job's input images (one row per picture) in ``session``."""
    for role, role_keys in keys.items():
        for index, key in enumerate(role_keys):
            session.add(JobInput(job_id=job_id, role=role, index=index, key=key))


async def load_references(session: AsyncSession, store: MediaStore, job_id: str) -> dict[str, list[str]]:
    """A job's input images as base64 PNGs by role, in order: what ``JobRequest.references`` takes."""
    rows = await session.scalars(
        select(JobInput).where(JobInput.job_id == job_id).order_by(JobInput.role, JobInput.index)
    )
    out: dict[str, list[str]] = {}
    for row in rows:
        data = await store.get(row.key)
        out.setdefault(row.role, []).append(base64.b64encode(data).decode("ascii"))
    return out


def keys_payload(keys: InputKeys) -> dict[str, Any]:
    """Keys as plain JSON for a pending confirmation's payload."""
    return {role: list(values) for role, values in keys.items()}
