"""Images in the media store: their rows, metadata stripping and cached thumbnails.

Results from the workers arrive encoded once and without metadata, so the bot stores their
bytes as they are (``bot.results``). :func:`save_job_images` is for images from elsewhere, which
may carry EXIF, XMP, text chunks or ICC profiles: those are stripped unless the owner opted in.
"""

from __future__ import annotations

import asyncio
import io
import logging

from PIL import Image as PILImage
from PIL import ImageOps
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from bot.models import Image, Job
from bot.storage import (
    THUMBNAIL_MAX_SIDE,
    MediaNotFound,
    MediaStore,
    MediaStoreError,
    job_image_key,
    thumbnail_key,
)

log = logging.getLogger(__name__)

THUMBNAIL_QUALITY = 80
EXIF_ORIENTATION = 0x0112

# Pillow format name → (file extension, content type) for the formats we accept and re-encode.
FORMATS: dict[str, tuple[str, str]] = {
    "PNG": ("png", "image/png"),
    "JPEG": ("jpg", "image/jpeg"),
    "MPO": ("jpg", "image/jpeg"),  # a JPEG with extra frames (some cameras); the first frame is kept
    "WEBP": ("webp", "image/webp"),
}
CONTENT_TYPES = {ext: content_type for ext, content_type in FORMATS.values()}


def strip_metadata(data: bytes) -> bytes:
    """Re-encode a PNG, JPEG or WebP with no EXIF, XMP, text chunks or ICC profile.

    Pixels are kept (PNG and WebP lossless stay lossless; JPEG keeps its own quantisation where it
    can). An EXIF orientation is applied to the pixels first, so dropping the tag does not turn
    a photo sideways. Raises ``ValueError`` for anything that is not one of those formats.
    """
    try:
        img = PILImage.open(io.BytesIO(data))
        img.load()
    except (OSError, SyntaxError, PILImage.DecompressionBombError) as exc:
        raise ValueError(f"not a readable image: {exc}") from exc
    fmt = img.format or ""
    if fmt not in FORMATS:
        raise ValueError(f"unsupported image format {fmt!r}")

    # exif_transpose always returns a copy, which would lose the JPEG quantisation tables, so
    # it is only called when there is an orientation to apply.
    rotated = img.getexif().get(EXIF_ORIENTATION, 1) in range(2, 9)
    out_img = ImageOps.exif_transpose(img) if rotated else img
    # Pillow's encoders fall back to im.info for some chunks (the PNG ICC profile, for one), so
    # the info dict is emptied rather than merely not passed on. Palette transparency is pixel
    # data, not metadata, and must survive.
    transparency = img.info.get("transparency")
    out_img.info = {} if transparency is None else {"transparency": transparency}
    out_img.encoderinfo = {}

    out = io.BytesIO()
    if fmt == "PNG":
        out_img.save(out, "PNG", compress_level=6)
    elif fmt in ("JPEG", "MPO"):
        if out_img.mode not in ("RGB", "L", "CMYK"):
            out_img = out_img.convert("RGB")
        if not rotated and fmt == "JPEG":
            # Re-use the source's quantisation tables and subsampling: no further quality loss.
            out_img.save(out, "JPEG", quality="keep")
        else:
            out_img.save(out, "JPEG", quality=95)
    else:
        lossless = _webp_is_lossless(data)
        out_img.save(out, "WEBP", lossless=lossless, quality=100 if lossless else 95, method=4)
    return out.getvalue()


def _webp_is_lossless(data: bytes) -> bool:
    """Whether a WebP's image chunk is VP8L (lossless) rather than VP8 (lossy)."""
    offset = 12  # past "RIFF", the size and "WEBP"
    while offset + 8 <= len(data):
        fourcc = data[offset : offset + 4]
        if fourcc == b"VP8L":
            return True
        if fourcc == b"VP8 ":
            return False
        size = int.from_bytes(data[offset + 4 : offset + 8], "little")
        offset += 8 + size + (size & 1)  # chunks are padded to an even length
    return False


def probe(data: bytes) -> tuple[str, int, int]:
    """Pillow format name, width and height read from the header alone: no pixel is decoded.

    Raises ``ValueError`` for bytes that are not a PNG, JPEG or WebP.
    """
    try:
        with PILImage.open(io.BytesIO(data)) as img:
            fmt = img.format or ""
            width, height = img.size
    except (OSError, SyntaxError, PILImage.DecompressionBombError) as exc:
        raise ValueError(f"not a readable image: {exc}") from exc
    if fmt not in FORMATS:
        raise ValueError(f"unsupported image format {fmt!r}")
    return fmt, width, height


def _prepare(data: bytes, keep_metadata: bool) -> tuple[bytes, str, int, int]:
    if not keep_metadata:
        data = strip_metadata(data)
    fmt, width, height = probe(data)
    return data, fmt, width, height


async def save_job_images(
    store: MediaStore,
    session: AsyncSession,
    job: Job,
    images: list[tuple[int, bytes]],
    *,
    keep_metadata: bool = False,
) -> list[Image]:
    """Store a job's images and add (or update) their ``Image`` rows; returns them by index.

    Bytes are stored under ``jobs/<job id>/<index>.<ext>`` with metadata stripped unless
    ``keep_metadata`` (the owner's opt-in). Saving again for the same job and index replaces the
    bytes and updates the existing row instead of adding a second one, so a retried delivery is
    harmless. Bytes are written before the rows so a row never points at a missing object. The
    rows are flushed, not committed: the caller owns the transaction.
    """
    for index, _ in images:
        if not isinstance(index, int) or index < 0:
            raise ValueError(f"invalid image index {index!r}")

    saved: list[Image] = []
    for index, raw in sorted(images, key=lambda item: item[0]):
        # Decoding and re-encoding a 2048px PNG takes a while; keep it off the event loop.
        data, fmt, width, height = await asyncio.to_thread(_prepare, raw, keep_metadata)
        ext = FORMATS[fmt][0]
        saved.append(await put_image(store, session, job.id, index, data, ext=ext, size=(width, height)))
    return saved


async def put_image(
    store: MediaStore,
    session: AsyncSession,
    job_id: str,
    index: int,
    data: bytes,
    *,
    ext: str,
    size: tuple[int, int],
) -> Image:
    """Store encoded bytes as image ``index`` of a job and add (or update) its ``Image`` row.

    The bytes go under ``jobs/<job id>/<index>.<ext>`` untouched. Saving again for the same job
    and index replaces the bytes and updates the row instead of adding a second one, so a retried
    delivery is harmless. Bytes are written before the row so a row never points at a missing
    object. The row is flushed, not committed: the caller owns the transaction.
    """
    if not isinstance(index, int) or index < 0:
        raise ValueError(f"invalid image index {index!r}")
    content_type = CONTENT_TYPES[ext]
    key = job_image_key(job_id, index, ext)
    try:
        await store.put(key, data, content_type)
    except MediaStoreError:
        raise
    except Exception as exc:
        # One exception type for every backend, so callers tell a store failure from a database one.
        raise MediaStoreError(f"could not store {key}: {type(exc).__name__}: {exc}") from exc
    width, height = size
    row = (await session.scalars(select(Image).where(Image.job_id == job_id, Image.index == index))).first()
    if row is None:
        row = Image(
            job_id=job_id, index=index, key=key, width=width, height=height, content_type=content_type
        )
        session.add(row)
    else:
        old_key = row.key
        row.key, row.width, row.height, row.content_type = key, width, height, content_type
        # New bytes make the cached thumbnail stale; a changed format leaves an orphan file.
        for stale in {thumbnail_key(old_key), thumbnail_key(key)}:
            await store.delete(stale)
        if old_key != key:
            await store.delete(old_key)
    await session.flush()
    return row


def _make_thumbnail(data: bytes, max_side: int) -> bytes:
    with PILImage.open(io.BytesIO(data)) as img:
        img.draft("RGB", (max_side, max_side))  # JPEG: decode at a reduced scale, much faster
        img = ImageOps.exif_transpose(img)
        if img.mode not in ("RGB", "RGBA"):
            img = img.convert("RGBA" if "A" in img.getbands() or "transparency" in img.info else "RGB")
        img.thumbnail((max_side, max_side), PILImage.Resampling.LANCZOS)
        img.info = {}
        out = io.BytesIO()
        img.save(out, "WEBP", quality=THUMBNAIL_QUALITY, method=4)
        return out.getvalue()


async def thumbnail(store: MediaStore, key: str, max_side: int = THUMBNAIL_MAX_SIDE) -> bytes:
    """A WebP of the image at ``key`` fitting in ``max_side``², made once and cached in the store.

    Raises ``MediaNotFound`` when the source image is missing. Two concurrent first requests may
    both render it; the store's atomic put makes that harmless.
    """
    if not 16 <= max_side <= 4096:
        raise ValueError(f"thumbnail size out of range: {max_side}")
    thumb_key = thumbnail_key(key, max_side)
    try:
        return await store.get(thumb_key)
    except MediaNotFound:
        pass
    source = await store.get(key)
    data = await asyncio.to_thread(_make_thumbnail, source, max_side)
    await store.put(thumb_key, data, "image/webp")
    return data
