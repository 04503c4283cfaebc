"""Results: the version check, images stored as the worker sent them, tiles cut once on demand.

The codec counts below are the point of the typed result: a grid goes from the worker's message
to disk and to Discord without the bot decoding or encoding a pixel (before the typed result the
bot decoded 9 and encoded 10 images per grid, measured with the same counter).
"""

from __future__ import annotations

import base64
import io
from typing import Any

import pytest
from PIL import Image as PILImage
from sqlalchemy import select

from bot.models import Image, Job, JobStatus
from bot.results import WRONG_VERSION, ResultRejected, check_result, crop_tile, read_outcome
from tests.botutil import (
    Harness,
    attachment_bytes,
    finish_grid,
    has_result,
    image_of,
    png_bytes,
)
from tests.imagecount import count_codec
from workers.schema import (
    SCHEMA_VERSION,
    EngineReport,
    ImageFormat,
    ImageOut,
    JobKind,
    JobResult,
    Layout,
    Timings,
    b64encode_bytes,
)

pytestmark = pytest.mark.timeout(60)
RED, GREEN, BLUE, YELLOW = (220, 30, 30), (30, 220, 30), (30, 30, 220), (220, 220, 30)


def grid_png(side: int = 32) -> bytes:
    grid = PILImage.new("RGB", (side * 2, side * 2))
    for i, color in enumerate((RED, GREEN, BLUE, YELLOW)):
        grid.paste(PILImage.new("RGB", (side, side), color), ((i % 2) * side, (i // 2) * side))
    out = io.BytesIO()
    grid.save(out, "PNG")
    return out.getvalue()


def result(data: bytes, size: tuple[int, int], layout: Layout = Layout.GRID, **image: Any) -> JobResult:
    return JobResult(
        job_id="j",
        layout=layout,
        image=ImageOut(data_b64=b64encode_bytes(data), width=size[0], height=size[1], **image),
        tile_width=size[0] // 2,
        tile_height=size[1] // 2,
        seed=1,
        timings=Timings(generation_s=1.0, total_s=1.5),
        report=EngineReport(engine="sdxl", model="tiny"),
    )


# --- pure checks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [None, 1, SCHEMA_VERSION + 1])
def test_results_of_another_version_are_refused(version: int | None) -> None:
    raw: dict[str, Any] = {"job_id": "j", "images": [], "seed": 1, "engine": "sdxl"}  # the v1 shape
    if version is not None:
        raw["version"] = version
    with pytest.raises(ResultRejected, match="different version") as caught:
        read_outcome({"result": raw, "error": None})
    assert str(caught.value) == WRONG_VERSION


def test_a_current_result_is_read() -> None:
    outcome = read_outcome({"result": result(grid_png(), (64, 64)).model_dump(mode="json"), "error": None})
    assert outcome.result is not None and outcome.result.version == SCHEMA_VERSION
    with pytest.raises(ResultRejected, match="unreadable"):
        read_outcome({"result": {"version": SCHEMA_VERSION, "job_id": "j"}})


def test_checked_bytes_are_the_workers_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    data = grid_png()
    with count_codec(monkeypatch) as counts:
        checked = check_result(result(data, (64, 64)), JobKind.IMAGINE)
    assert checked.data == data and (checked.ext, checked.width, checked.height) == ("png", 64, 64)
    assert (counts.encodes, counts.decodes) == (0, 0)  # the header is enough


@pytest.mark.parametrize(
    ("kind", "made"),
    [
        (JobKind.UPSCALE, result(grid_png(), (64, 64))),  # a grid where one image was due
        (JobKind.IMAGINE, result(grid_png(), (64, 64), layout=Layout.SINGLE)),
        (JobKind.IMAGINE, result(grid_png(), (128, 64))),  # the size does not match the file
        (JobKind.IMAGINE, result(grid_png(), (64, 64), format=ImageFormat.WEBP)),  # nor the format
        (JobKind.IMAGINE, result(b"\x89PNG but not really", (64, 64))),
    ],
)
def test_unusable_images_are_refused(kind: JobKind, made: JobResult) -> None:
    with pytest.raises(ResultRejected, match="unusable"):
        check_result(made, kind)


def test_a_tile_is_one_decode_and_one_encode(monkeypatch: pytest.MonkeyPatch) -> None:
    grid = grid_png(32)
    with count_codec(monkeypatch) as counts:
        tile, width, height = crop_tile(grid, 4)
    assert (counts.decodes, counts.encodes) == (1, 1)
    assert (width, height) == (32, 32)
    assert image_of(tile).getpixel((5, 5)) == YELLOW and image_of(tile).size == (32, 32)
    with pytest.raises(ValueError, match="not a readable grid"):
        crop_tile(b"nope", 1)


# --- through the bot ----------------------------------------------------------------------------------


async def images_of(h: Harness, job_id: str) -> dict[int, Image]:
    async with h.sessions() as session:
        return {
            row.index: row for row in (await session.scalars(select(Image).where(Image.job_id == job_id)))
        }


async def test_a_grid_reaches_disk_and_discord_without_touching_a_pixel(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    inter = await h.imagine("a quiet harbour")
    job = await h.job_for(inter)
    await h.wait_job(job.id, lambda j: j.status == JobStatus.QUEUED)
    h.dispatcher.succeed(job.id, size=(256, 256), noise=True)
    sent = h.dispatcher.state[job.id].info["result"]["image"]["data_b64"]
    with count_codec(monkeypatch) as counts:
        h.bot.tracker.wake()
        message = await inter.wait_original(has_result)
        await h.wait_job(job.id, lambda j: j.message_id is not None)
    assert (counts.encodes, counts.decodes) == (0, 0)
    [grid] = (await images_of(h, job.id)).values()
    stored = await h.store.get(grid.key)
    assert b64encode_bytes(stored) == sent  # the worker's bytes, unchanged
    assert await attachment_bytes(h.fake, message) == stored
    assert (grid.index, grid.width, grid.height, grid.key.endswith(".png")) == (0, 512, 512, True)


async def test_generation_time_and_notes_come_from_the_result(h: Harness) -> None:
    inter = await h.imagine("a lantern")
    job = await h.job_for(inter)
    await h.wait_job(job.id, lambda j: j.status == JobStatus.QUEUED)
    h.dispatcher.succeed(job.id, notes=["--tile is not supported by this engine"], generation_s=7.25)
    h.bot.tracker.wake()
    message = await inter.wait_original(has_result)
    assert message["content"].endswith("\n-# \\--tile is not supported by this engine")
    done = await h.wait_job(job.id, lambda j: j.message_id is not None)
    assert done.generation_s == 7.25


async def test_a_result_of_another_version_fails_and_is_refunded(h: Harness) -> None:
    inter = await h.imagine("from the future")
    job = await h.job_for(inter)
    await h.wait_job(job.id, lambda j: j.status == JobStatus.QUEUED)
    h.dispatcher.finish(job.id, {"version": SCHEMA_VERSION + 1, "job_id": job.id, "pixels": "?"})
    h.bot.tracker.wake()
    final = await inter.wait_original(lambda m: "❌" in (m.get("content") or ""))
    assert "not available right now" in final["content"] and "Your 1 credit was refunded." in final["content"]
    assert "different version" not in final["content"]  # the worker's text stays in the logs
    failed = await h.wait_job(job.id, lambda j: j.status == JobStatus.FAILED)
    assert failed.error == WRONG_VERSION


async def test_a_u_tile_is_cut_once_and_reused(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    job, message = await finish_grid(h, "twins")
    with count_codec(monkeypatch) as first_counts:
        first = await h.fake.press(f"mj:u:{job.id}:2", message)
        await first.wait_original(has_result)
    with count_codec(monkeypatch) as again_counts:
        again = await h.fake.press(f"mj:u:{job.id}:2", message)
        again_message = await again.wait_original(has_result)
    assert (first_counts.decodes, first_counts.encodes) == (1, 1)
    assert (again_counts.decodes, again_counts.encodes) == (0, 0)
    parent_images = await images_of(h, job.id)
    assert sorted(parent_images) == [0, 2]  # the tile is kept with the grid it came from
    crops = [await h.job_for(first), await h.job_for(again)]
    keys = {(await images_of(h, crop.id))[0].key for crop in crops}
    assert keys == {parent_images[2].key}  # both crops point at the one stored tile
    assert image_of(await attachment_bytes(h.fake, again_message)).getpixel((3, 3)) == (30, 220, 30)


async def test_old_grids_with_stored_tiles_keep_working(h: Harness) -> None:
    job, message = await finish_grid(h, "from an older version")
    # Older versions stored the four tiles next to the grid at 1..4.
    async with h.sessions() as session, session.begin():
        for index in range(1, 5):
            key = f"jobs/{job.id}/{index}.png"
            await h.store.put(key, png_bytes(64, 64, (9, 9, 9 * index)), "image/png")
            session.add(Image(job_id=job.id, index=index, key=key, width=64, height=64))
    press = await h.fake.press(f"mj:u:{job.id}:3", message)
    crop_message = await press.wait_original(has_result)
    assert image_of(await attachment_bytes(h.fake, crop_message)).getpixel((0, 0)) == (9, 9, 27)
    variation = await h.fake.press(f"mj:v:{job.id}:4", message)
    [*_, request] = await h.dispatcher.wait_sent(2)
    assert request.job_id == (await h.job_for(variation)).id
    assert image_of(base64.b64decode(request.input_image or "")).getpixel((0, 0)) == (9, 9, 36)


async def test_a_crop_job_row_is_done_without_generation(h: Harness) -> None:
    job, message = await finish_grid(h, "one of four")
    press = await h.fake.press(f"mj:u:{job.id}:1", message)
    await press.wait_original(has_result)
    crop = await h.wait_job((await h.job_for(press)).id, lambda j: j.message_id is not None)
    assert isinstance(crop, Job) and crop.kind == JobKind.CROP and crop.generation_s == 0.0
    assert crop.status == JobStatus.DONE and crop.task_id is None
