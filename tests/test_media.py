"""Images in the media store: metadata stripping, image rows, and cached thumbnails."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from PIL import Image as PILImage
from PIL import ImageCms
from PIL.PngImagePlugin import PngInfo
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.media import save_job_images, strip_metadata, thumbnail
from bot.models import Image, Job, JobStatus, Member
from bot.storage import LocalMediaStore, MediaNotFound, thumbnail_key

SECRET = "GPS 51.5007N 0.1246W secret-workflow"


def _exif(orientation: int | None = None) -> bytes:
    exif = PILImage.Exif()
    exif[0x010E] = SECRET  # ImageDescription
    exif[0x0131] = "SecretCamera 9000"  # Software
    if orientation is not None:
        exif[0x0112] = orientation
    return exif.tobytes()


def _icc() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def png_with_metadata(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 40, 90)) -> bytes:
    """A PNG carrying a tEXt chunk, an iTXt chunk, EXIF and an ICC profile."""
    info = PngInfo()
    info.add_text("parameters", SECRET)
    info.add_itxt("Comment", SECRET)
    img = PILImage.new("RGB", size, color)
    img.putpixel((1, 1), (1, 2, 3))
    out = io.BytesIO()
    img.save(out, "PNG", pnginfo=info, exif=_exif(), icc_profile=_icc())
    return out.getvalue()


def plain_png(size: tuple[int, int], color: tuple[int, int, int] = (10, 120, 200)) -> bytes:
    """A PNG with nothing but pixels."""
    out = io.BytesIO()
    PILImage.new("RGB", size, color).save(out, "PNG")
    return out.getvalue()


def _assert_clean(data: bytes) -> None:
    assert SECRET.encode() not in data
    assert b"SecretCamera" not in data
    for chunk in (b"tEXt", b"iTXt", b"zTXt", b"eXIf", b"iCCP", b"Exif\x00\x00", b"ICC_PROFILE"):
        assert chunk not in data, chunk
    with PILImage.open(io.BytesIO(data)) as img:
        assert "exif" not in img.info
        assert "icc_profile" not in img.info
        assert not dict(img.getexif())
        assert not getattr(img, "text", {})


# --- metadata ------------------------------------------------------------------------------


def test_strip_metadata_png() -> None:
    original = png_with_metadata()
    assert SECRET.encode() in original and b"iCCP" in original and b"eXIf" in original
    stripped = strip_metadata(original)
    _assert_clean(stripped)
    with PILImage.open(io.BytesIO(original)) as a, PILImage.open(io.BytesIO(stripped)) as b:
        assert b.format == "PNG"
        assert a.size == b.size
        assert a.tobytes() == b.tobytes()  # lossless: same pixels


def test_strip_metadata_png_keeps_palette_transparency() -> None:
    img = PILImage.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.putpixel((0, 0), 1)
    out = io.BytesIO()
    info = PngInfo()
    info.add_text("Comment", SECRET)
    img.save(out, "PNG", transparency=0, pnginfo=info)
    stripped = strip_metadata(out.getvalue())
    _assert_clean(stripped)
    with PILImage.open(io.BytesIO(stripped)) as result:
        assert result.info.get("transparency") == 0


def test_strip_metadata_jpeg_and_orientation() -> None:
    out = io.BytesIO()
    img = PILImage.new("RGB", (40, 20), (30, 160, 90))
    img.save(out, "JPEG", quality=90, exif=_exif(orientation=6), icc_profile=_icc(), comment=SECRET)
    original = out.getvalue()
    assert SECRET.encode() in original
    stripped = strip_metadata(original)
    _assert_clean(stripped)
    with PILImage.open(io.BytesIO(stripped)) as result:
        assert result.format == "JPEG"
        assert "comment" not in result.info
        # Orientation 6 (rotate 90°) was applied to the pixels before the tag was dropped.
        assert result.size == (20, 40)

    # Without an orientation the JPEG keeps its own quantisation (no second-generation loss).
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90, exif=_exif(), comment=SECRET)
    stripped = strip_metadata(out.getvalue())
    _assert_clean(stripped)
    with PILImage.open(io.BytesIO(out.getvalue())) as a, PILImage.open(io.BytesIO(stripped)) as b:
        assert a.quantization == b.quantization
        assert b.size == (40, 20)


@pytest.mark.parametrize("lossless", [True, False])
def test_strip_metadata_webp(lossless: bool) -> None:
    out = io.BytesIO()
    img = PILImage.new("RGB", (32, 32), (90, 20, 200))
    img.save(out, "WEBP", lossless=lossless, exif=_exif(), icc_profile=_icc(), xmp=SECRET.encode())
    original = out.getvalue()
    assert SECRET.encode() in original
    stripped = strip_metadata(original)
    _assert_clean(stripped)
    assert b"XMP " not in stripped
    assert (b"VP8L" in stripped) is lossless
    with PILImage.open(io.BytesIO(stripped)) as result:
        assert result.format == "WEBP"
        if lossless:
            assert result.convert("RGB").tobytes() == img.tobytes()


@pytest.mark.parametrize("data", [b"", b"not an image", b"GIF89a" + b"\0" * 20])
def test_strip_metadata_rejects_non_images(data: bytes) -> None:
    with pytest.raises(ValueError):
        strip_metadata(data)


def test_strip_metadata_rejects_other_formats() -> None:
    out = io.BytesIO()
    PILImage.new("RGB", (4, 4)).save(out, "GIF")
    with pytest.raises(ValueError):
        strip_metadata(out.getvalue())


# --- save_job_images -----------------------------------------------------------------------


async def make_job(session: AsyncSession, **overrides: Any) -> Job:
    """A member and a finished public job, flushed."""
    member = Member(guild_id=1, user_id=overrides.pop("user_id", 42), display_name="Alice")
    session.add(member)
    await session.flush()
    values: dict[str, Any] = {
        "member_id": member.id,
        "user_id": member.user_id,
        "guild_id": 1,
        "channel_id": 2,
        "kind": "imagine",
        "prompt": "a lighthouse at dusk",
        "params": {},
        "seed": 7,
        "engine": "sdxl",
        "visibility": "public",
        "status": JobStatus.DONE,
    }
    values.update(overrides)
    job = Job(**values)
    session.add(job)
    await session.flush()
    return job


async def _count_images(session: AsyncSession, job_id: str) -> int:
    return int(await session.scalar(select(func.count()).select_from(Image).where(Image.job_id == job_id)))


async def test_save_job_images_strips_and_is_idempotent(
    sessions: async_sessionmaker[AsyncSession], tmp_path: Path
) -> None:
    store = LocalMediaStore(tmp_path / "media")
    images = [(0, png_with_metadata((128, 128))), *[(i, png_with_metadata((64, 64))) for i in range(1, 5)]]
    async with sessions() as session:
        job = await make_job(session)
        rows = await save_job_images(store, session, job, images)
        await session.commit()
    assert [r.index for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0].key == f"jobs/{job.id}/0.png"
    assert (rows[0].width, rows[0].height, rows[0].content_type) == (128, 128, "image/png")
    for row in rows:
        _assert_clean(await store.get(row.key))

    # Warm a thumbnail, then save again (a retried delivery) with a different grid image.
    await thumbnail(store, rows[0].key)
    assert await store.exists(thumbnail_key(rows[0].key))
    async with sessions() as session:
        job = await session.get_one(Job, job.id)
        again = await save_job_images(store, session, job, [(0, plain_png((256, 128))), images[1]])
        await session.commit()
    async with sessions() as session:
        assert await _count_images(session, job.id) == 5
        grid = await session.scalar(select(Image).where(Image.job_id == job.id, Image.index == 0))
        assert grid is not None
        assert (grid.width, grid.height) == (256, 128)
        assert grid.id == rows[0].id
    assert [r.index for r in again] == [0, 1]
    # The stale thumbnail went with the old bytes.
    assert not await store.exists(thumbnail_key(rows[0].key))
    with PILImage.open(io.BytesIO(await thumbnail(store, rows[0].key))) as thumb:
        assert thumb.size == (256, 128)


async def test_save_job_images_keep_metadata(
    sessions: async_sessionmaker[AsyncSession], tmp_path: Path
) -> None:
    store = LocalMediaStore(tmp_path / "media")
    original = png_with_metadata()
    async with sessions() as session:
        job = await make_job(session)
        (row,) = await save_job_images(store, session, job, [(0, original)], keep_metadata=True)
        await session.commit()
    assert await store.get(row.key) == original


async def test_save_job_images_jpeg_key_and_type(
    sessions: async_sessionmaker[AsyncSession], tmp_path: Path
) -> None:
    store = LocalMediaStore(tmp_path / "media")
    out = io.BytesIO()
    PILImage.new("RGB", (30, 20), (1, 2, 3)).save(out, "JPEG", exif=_exif())
    async with sessions() as session:
        job = await make_job(session)
        (row,) = await save_job_images(store, session, job, [(0, out.getvalue())])
        await session.commit()
    assert row.key == f"jobs/{job.id}/0.jpg"
    assert row.content_type == "image/jpeg"
    _assert_clean(await store.get(row.key))


async def test_save_job_images_rejects_bad_input(
    sessions: async_sessionmaker[AsyncSession], tmp_path: Path
) -> None:
    store = LocalMediaStore(tmp_path / "media")
    async with sessions() as session:
        job = await make_job(session)
        with pytest.raises(ValueError):
            await save_job_images(store, session, job, [(-1, plain_png((4, 4)))])
        with pytest.raises(ValueError):
            await save_job_images(store, session, job, [(0, b"garbage")])
        assert await _count_images(session, job.id) == 0


# --- thumbnails ----------------------------------------------------------------------------


async def test_thumbnail_is_made_once_and_cached(tmp_path: Path) -> None:
    store = LocalMediaStore(tmp_path)
    await store.put("jobs/j/0.png", png_with_metadata((1000, 500)), "image/png")
    first = await thumbnail(store, "jobs/j/0.png")
    key = thumbnail_key("jobs/j/0.png")
    assert key == "thumbs/384/jobs/j/0.webp"
    assert await store.get(key) == first
    with PILImage.open(io.BytesIO(first)) as thumb:
        assert thumb.format == "WEBP"
        assert thumb.size == (384, 192)
    _assert_clean(first)

    # A second call serves the cached object rather than rendering again.
    await store.put(key, b"cached", "image/webp")
    assert await thumbnail(store, "jobs/j/0.png") == b"cached"

    # Other sizes are cached separately.
    small = await thumbnail(store, "jobs/j/0.png", max_side=64)
    with PILImage.open(io.BytesIO(small)) as thumb:
        assert thumb.size == (64, 32)


async def test_thumbnail_missing_source(tmp_path: Path) -> None:
    store = LocalMediaStore(tmp_path)
    with pytest.raises(MediaNotFound):
        await thumbnail(store, "jobs/nope/0.png")
    with pytest.raises(ValueError):
        await thumbnail(store, "../x.png")
