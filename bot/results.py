"""Results: read a worker's outcome, store its image as it came, and cut grid tiles on demand.

A worker sends one image per job, encoded once and without metadata (``workers.schema.JobResult``):
a composed 2x2 grid or a single image. The bot checks the version and the file's header (format
and size, no pixel decoding), then stores the bytes untouched under index 0. Tiles are not stored
up front: a U# press, or a V# that needs a tile as its input, crops it from the stored grid
(decode once, crop, encode once) and stores it as image ``index`` of the grid, so the next press
on the same tile reuses it. Grids stored by older versions, with their four tiles at 1..4,
work the same way: their tiles are simply found.

Before a result is stored, :func:`screen` applies the owner's safety policy
(``bot.content_rules``) to the worker's verdicts in the channel the job came from.
"""

from __future__ import annotations

import asyncio
import binascii
import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image as PILImage
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.content_rules import (
    SAFETY_KEY,
    SafetyAction,
    SafetyPolicy,
    flagged_labels,
    job_channel_nsfw,
    safety_action,
    verdict_payload,
)
from bot.media import FORMATS, probe, put_image
from bot.models import Image, Job
from bot.operations import grid_count
from bot.storage import MediaNotFound, MediaStore
from workers.schema import (
    SCHEMA_VERSION,
    DescribeResult,
    ErrorCode,
    JobKind,
    JobResult,
    Layout,
    SafetyVerdict,
    TaskOutcome,
    b64decode_text,
    nearest_bucket,
)

log = logging.getLogger(__name__)

WRONG_VERSION = "The worker runs a different version of Mirage than the bot, so its result could not be used."
UNREADABLE = "The worker returned an unreadable result."
UNUSABLE = "The engine returned unusable images."
DESCRIBE_KEY = "describe"  # job params: /describe's prompts and the picture's --ar
BLOCKED_DETAIL = "The image safety filter flagged the result ({labels}); nothing was posted."
PNG_COMPRESS_LEVEL = 6  # a tile is encoded once; level 6 is Pillow's balance of size and time


class ResultRejected(Exception):
    """A worker's result the bot will not deliver; the job fails with ``code`` and ``str()``."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class CheckedImage:
    """Encoded image bytes whose header was checked: ready to store as they are."""

    data: bytes
    ext: str
    width: int
    height: int


def read_outcome(info: Any) -> TaskOutcome:
    """A task's SUCCESS payload as a ``TaskOutcome``, refusing results of another schema version.

    The version is read before full validation: a result from an older or newer worker would
    otherwise surface as a confusing validation error instead of saying what is wrong.
    """
    raw = info.get("result") if isinstance(info, dict) else None
    if isinstance(raw, dict) and raw.get("version", 1) != SCHEMA_VERSION:
        log.error("worker result has schema version %r, the bot %s", raw.get("version", 1), SCHEMA_VERSION)
        # A worker of another version is, for this bot, an engine that is not available.
        raise ResultRejected(ErrorCode.ENGINE_UNAVAILABLE, WRONG_VERSION)
    try:
        return TaskOutcome.model_validate(info)
    except ValidationError as exc:
        log.error("unreadable task outcome: %s", exc.errors()[:3])
        raise ResultRejected(ErrorCode.ENGINE_ERROR, UNREADABLE) from exc


def check_result(result: JobResult, kind: JobKind) -> CheckedImage:
    """The result's image bytes, after checking its layout, format and size from the header."""
    expected = Layout.SINGLE if grid_count(kind) == 1 else Layout.GRID
    if result.layout != expected:
        log.error("a %s job returned a %s image", kind.value, result.layout.value)
        raise ResultRejected(ErrorCode.ENGINE_ERROR, UNUSABLE)
    try:
        data = b64decode_text(result.image.data_b64)
        fmt, width, height = probe(data)
    except (binascii.Error, ValueError) as exc:
        log.error("worker image is not a readable %s: %s", result.image.format.value, exc)
        raise ResultRejected(ErrorCode.ENGINE_ERROR, UNUSABLE) from exc
    ext = FORMATS[fmt][0]
    if ext != result.image.format.value or (width, height) != (result.image.width, result.image.height):
        log.error(
            "worker image is %s %dx%d but claims %s %dx%d",
            ext,
            width,
            height,
            result.image.format.value,
            result.image.width,
            result.image.height,
        )
        raise ResultRejected(ErrorCode.ENGINE_ERROR, UNUSABLE)
    return CheckedImage(data=data, ext=ext, width=width, height=height)


def screen(job: Job, verdicts: Sequence[SafetyVerdict], policy: SafetyPolicy) -> SafetyAction:
    """What to do with ``job``'s result given its images' ``verdicts``; flagged ones are logged.

    The channel is the one recorded when the job was accepted (an age-restricted channel may
    get flagged results as they are, if the policy allows it).
    """
    action = safety_action(verdicts, job_channel_nsfw(job.params), policy)
    if any(verdict.unsafe for verdict in verdicts):
        log.warning(
            "job %s: the safety filter flagged %s; %s",
            job.id,
            ", ".join(flagged_labels(verdicts)),
            "blocked" if action is SafetyAction.BLOCK else f"posted ({action.value})",
        )
    return action


def blocked_detail(verdicts: Sequence[SafetyVerdict]) -> str:
    """The log-only reason stored on a blocked job (members read ``BLOCKED_MESSAGE``)."""
    return BLOCKED_DETAIL.format(labels=", ".join(flagged_labels(verdicts)) or "unknown")


def crop_tile(grid: bytes, index: int) -> tuple[bytes, int, int]:
    """Tile ``index`` (1-4, U1..U4 order) of a 2x2 grid as PNG: one decode, one encode.

    Raises ``ValueError`` when the grid is not a readable image.
    """
    if not 1 <= index <= 4:
        raise ValueError(f"no tile {index} in a grid")
    try:
        with PILImage.open(io.BytesIO(grid)) as img:
            width, height = img.width // 2, img.height // 2
            left, top = ((index - 1) % 2) * width, ((index - 1) // 2) * height
            tile = img.crop((left, top, left + width, top + height))
    except (OSError, SyntaxError, ValueError, PILImage.DecompressionBombError) as exc:
        raise ValueError(f"not a readable grid: {exc}") from exc
    tile.info = {}  # crop copies the grid's info; none of it belongs in the tile's file
    out = io.BytesIO()
    tile.save(out, "PNG", compress_level=PNG_COMPRESS_LEVEL)
    return out.getvalue(), width, height


def shape_params(width: int, height: int) -> dict[str, Any]:
    """The ``aspect`` (whole numbers, reduced) and bucket parameters of a picture's shape."""
    divisor = math.gcd(width, height)
    aspect = (width // divisor, height // divisor)
    bucket = nearest_bucket(*aspect)
    return {"aspect": list(aspect), "width": bucket[0], "height": bucket[1]}


class Results:
    """Stores results and tiles; every image row of a job goes through here or ``bot.media``."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], store: MediaStore) -> None:
        self.sessions = sessions
        self.store = store

    async def save(self, session: AsyncSession, job_id: str, image: CheckedImage) -> Image:
        """In the caller's transaction: store a checked result image as image 0 of the job.

        A pan or Make Square result has a new shape: its ``--ar`` becomes that shape, as in
        Midjourney, so its prompt line says so and a later Zoom Out keeps the shape instead of
        going back to the parent's.
        """
        row = await session.get(Job, job_id)
        if row is not None and row.kind in (JobKind.PAN.value, JobKind.SQUARE.value):
            row.params = {**(row.params or {}), **shape_params(image.width, image.height)}
        return await put_image(
            self.store, session, job_id, 0, image.data, ext=image.ext, size=(image.width, image.height)
        )

    async def keep_verdicts(
        self, session: AsyncSession, job_id: str, verdicts: Sequence[SafetyVerdict]
    ) -> None:
        """In the caller's transaction: store the verdicts a job's delivery is judged by."""
        row = await session.get(Job, job_id)
        if row is not None:
            row.params = {**(row.params or {}), SAFETY_KEY: verdict_payload(verdicts)}

    async def save_description(self, session: AsyncSession, job_id: str, described: DescribeResult) -> None:
        """In the caller's transaction: keep ``/describe``'s suggestions on its job (no image)."""
        row = await session.get(Job, job_id)
        if row is not None:
            prompts = [text for text in described.prompts if text.strip()]
            row.params = {
                **(row.params or {}),
                DESCRIBE_KEY: {"prompts": prompts, "aspect": described.aspect},
            }

    async def image(self, job_id: str, index: int = 0) -> Image:
        """The row of a job's image ``index``; raises ``MediaNotFound`` when there is none."""
        async with self.sessions() as session:
            row = (
                await session.scalars(select(Image).where(Image.job_id == job_id, Image.index == index))
            ).first()
        if row is None:
            raise MediaNotFound(f"{job_id}/{index}")
        return row

    async def tile(self, parent_id: str, index: int) -> tuple[Image, bytes]:
        """Tile ``index`` of a stored grid (its row and bytes), cropping and storing it on first use.

        Raises ``MediaNotFound`` when the grid is gone and ``ValueError`` when the stored tile
        or grid is not a readable image.
        """
        try:
            row = await self.image(parent_id, index)
        except MediaNotFound:
            pass
        else:
            data = await self.store.get(row.key)
            await asyncio.to_thread(probe, data)  # a stored tile is reused only if it is an image
            return row, data
        grid = await self.store.get((await self.image(parent_id, 0)).key)
        data, width, height = await asyncio.to_thread(crop_tile, grid, index)
        try:
            async with self.sessions() as session, session.begin():
                row = await put_image(
                    self.store, session, parent_id, index, data, ext="png", size=(width, height)
                )
        except IntegrityError:
            # Another press cut the same tile at the same moment; its row (same bytes) wins.
            row = await self.image(parent_id, index)
        return row, data

    async def input_image(self, parent_id: str, index: int | None) -> bytes:
        """The bytes a follow-up job starts from: a grid's tile ``index``, or the single image."""
        if index:
            return (await self.tile(parent_id, index))[1]
        return await self.store.get((await self.image(parent_id, 0)).key)

    async def share(self, session: AsyncSession, job_id: str, source: Image) -> Image:
        """In the caller's transaction: make ``source`` (a stored tile) image 0 of a crop job.

        The crop job points at the tile's bytes rather than copying them: a tile is stored once.
        """
        row = Image(
            job_id=job_id,
            index=0,
            key=source.key,
            width=source.width,
            height=source.height,
            content_type=source.content_type,
        )
        session.add(row)
        await session.flush()
        return row
