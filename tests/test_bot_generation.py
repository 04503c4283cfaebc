"""End to end with a real Celery worker: fake Discord → bot → database → Redis → worker (tiny SDXL).

One worker process serves the whole module (module-scoped fixture, warmed up once); each test
gets its own bot, database and media folder. The tiny model runs at 64 px with 2 steps.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from bot.dispatch import CeleryDispatcher
from bot.models import Image, JobStatus, Member
from tests.botutil import (
    GRID_IDS,
    Harness,
    WorkerProcess,
    attachment_bytes,
    bot_harness,
    custom_ids,
    has_result,
    image_of,
    labels,
    row_sizes,
)
from workers.schema import Engine, ErrorCode, JobKind

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.timeout(180)]


@pytest.fixture
async def h(worker: WorkerProcess, redis_url: str, tmp_path: Path, sqlite_url: str) -> Any:
    dispatcher = CeleryDispatcher.from_urls(redis_url, redis_url, queues={Engine.SDXL: worker.queue})
    try:
        async with bot_harness(
            tmp_path, sqlite_url, dispatcher, broker_url=redis_url, result_backend=redis_url
        ) as harness:
            yield harness
    finally:
        await dispatcher.close()


async def grid(h: Harness, prompt: str, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    inter = await h.imagine(prompt, **kwargs)
    message = await inter.wait_original(has_result, timeout=60)
    job = await h.wait_job((await h.job_for(inter)).id, lambda j: j.message_id is not None)
    return job, message


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_imagine_end_to_end(
    backend: str, worker: WorkerProcess, redis_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("sqlite_url" if backend == "sqlite" else "pg_url")
    dispatcher = CeleryDispatcher.from_urls(redis_url, redis_url, queues={Engine.SDXL: worker.queue})
    async with bot_harness(tmp_path, url, dispatcher, broker_url=redis_url, result_backend=redis_url) as h:
        inter = await h.imagine("a tiny robot --seed 7 --steps 2")
        callback = await inter.callback()
        assert callback.callback_type == 5 and callback.status == 200
        # The first edit of the deferred message says where the job is in line.
        first_edit = (await inter.edits(1))[0]
        assert "(Waiting to start)" in first_edit.json["content"]
        message = await inter.wait_original(has_result, timeout=60)
        assert message["id"] == str(inter.original_message_id)  # the deferred message became the result
        assert message["content"] == f"**a tiny robot --seed 7 --steps 2** - <@{h.fake.user.id}> (fast)"
        assert len(custom_ids(message)) == GRID_IDS and row_sizes(message) == [5, 5]
        assert labels(message) == ["U1", "U2", "U3", "U4", "🔄", "V1", "V2", "V3", "V4", "Web"]
        grid_image = image_of(await attachment_bytes(h.fake, message))
        assert grid_image.size == (128, 128)

        job = await h.wait_job((await h.job_for(inter)).id, lambda j: j.message_id is not None)
        assert job.status == JobStatus.DONE and job.delivered and job.seed == 7 and job.started_at
        async with h.sessions() as session:
            images = (await session.scalars(select(Image).where(Image.job_id == job.id))).all()
            member = (await session.scalars(select(Member).where(Member.user_id == h.fake.user.id))).one()
        assert sorted(i.index for i in images) == [0]  # the worker's grid; tiles are cut on demand
        assert job.generation_s is not None and 0 < job.generation_s < 60  # the worker's own timing
        assert all([await h.store.exists(i.key) for i in images])
        assert member.credits_used == 1
    await dispatcher.close()


async def test_u_button_is_a_crop_of_the_real_grid(h: Harness) -> None:
    job, message = await grid(h, "crop me")
    grid_image = image_of(await attachment_bytes(h.fake, message))
    press = await h.fake.press(f"mj:u:{job.id}:4", message)
    result = await press.wait_original(has_result, timeout=10)
    tile = image_of(await attachment_bytes(h.fake, result))
    assert tile.tobytes() == grid_image.crop((64, 64, 128, 128)).tobytes()
    crop = await h.job_for(press)
    assert crop.kind == JobKind.CROP and crop.generation_s == 0.0 and crop.task_id is None


async def test_every_generating_button(h: Harness) -> None:
    """V#, 🔄, Vary, Upscale, Zoom, Pan and Make Square on real images; each by another member.

    One of each operation runs on the worker (every variant's parameters are checked with the fake
    dispatcher in test_buttons), which keeps this under a minute on two CPU cores.
    """
    job, message = await grid(h, "a wide valley --ar 3:2")
    press = await h.fake.press(f"mj:u:{job.id}:1", message)
    single = await press.wait_original(has_result, timeout=10)
    crop = await h.job_for(press)
    tile = image_of(await attachment_bytes(h.fake, single))
    width, height = tile.size
    assert width > height and "Make Square" in labels(single)

    actions = [
        (f"mj:v:{job.id}:2", message, "grid", (width, height)),
        (f"mj:r:{job.id}", message, "grid", (width, height)),
        (f"mj:vary:{crop.id}:subtle", single, "grid", (width, height)),
        (f"mj:up:{crop.id}:subtle", single, "single", (2 * width, 2 * height)),
        (f"mj:zoom:{crop.id}:2", single, "grid", None),
        (f"mj:pan:{crop.id}:l", single, "grid", "wider"),
        (f"mj:pan:{crop.id}:u", single, "grid", "taller"),
        (f"mj:sq:{crop.id}", single, "grid", "square"),
    ]
    presses = []
    for n, (custom_id, target, _kind, _size) in enumerate(actions):
        member = h.fake.add_member(h.fake.guild, f"presser{n}")
        presses.append(await h.fake.press(custom_id, target, user=member))
    for press, (custom_id, _target, kind, size) in zip(presses, actions, strict=True):
        result = await press.wait_original(has_result, timeout=90)
        image = image_of(await attachment_bytes(h.fake, result))
        if kind == "grid":
            assert len(custom_ids(result)) == GRID_IDS, custom_id
            tile_size = (image.width // 2, image.height // 2)
        else:
            assert "Upscaled" in result["content"] and "Vary (Subtle)" in labels(result)
            tile_size = image.size
        if isinstance(size, tuple):
            assert tile_size == size, custom_id
        elif size == "wider":
            assert tile_size[0] > width, custom_id
        elif size == "taller":
            assert tile_size[1] > height, custom_id
        elif size == "square":
            assert tile_size[0] == tile_size[1], custom_id
        new = await h.job_for(press)
        assert new.status == JobStatus.DONE and new.user_id != h.fake.user.id


async def test_corrupt_input_image_fails_and_refunds(h: Harness) -> None:
    job, message = await grid(h, "fragile")
    async with h.sessions() as session:
        row = (await session.scalars(select(Image).where(Image.job_id == job.id, Image.index == 0))).one()
    # V2's input is cut from the stored grid when pressed, so a corrupt grid is caught right there.
    await h.store.put(row.key, b"this is not a png", "image/png")
    press = await h.fake.press(f"mj:v:{job.id}:2", message)
    failed = await press.wait_original(lambda m: "❌" in (m.get("content") or ""), timeout=30)
    assert "could not be used" in failed["content"] and "refunded" in failed["content"]
    new = await h.wait_job((await h.job_for(press)).id, lambda j: j.delivered)
    assert new.status == JobStatus.FAILED and new.error_code == ErrorCode.BAD_INPUT
    async with h.sessions() as session:
        member = (await session.scalars(select(Member).where(Member.user_id == h.fake.user.id))).one()
    assert member.credits_used == 1  # the grid; the variation was refunded


async def test_oversized_attachment_is_reencoded_not_dropped(h: Harness) -> None:
    # Announced limit: the interaction says 6 kB, the bot encodes under it from the start.
    h.fake.attachment_size_limit = 6000
    inter = await h.imagine("noisy")
    message = await inter.wait_original(has_result, timeout=60)
    attachment = message["attachments"][0]
    assert attachment["size"] <= 6000 and attachment["filename"].rsplit(".", 1)[1] in ("webp", "jpg", "png")
    assert not [(r.files[0].filename, len(r.files[0].data)) for r in inter.requests if r.status == 413]

    # Unannounced limit: the server refuses (413/40005) and the bot shrinks until it fits.
    h.fake.attachment_size_limit = 10 * 1024 * 1024
    inter = await h.imagine("noisy again")
    job = await h.job_for(inter)
    await h.wait_job(job.id, lambda j: j.status in (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.DONE))
    h.fake.attachment_size_limit = 3000
    message = await inter.wait_original(has_result, timeout=60)
    assert message["attachments"][0]["size"] <= 3000
    assert [r for r in inter.requests if r.status == 413]


async def test_expired_token_result_goes_to_channel(h: Harness) -> None:
    inter = await h.imagine("slow delivery")
    await inter.callback()
    h.fake.expire_token(inter)
    post = await h.fake.wait_for_request(lambda r: r.route == "channel_message_create", timeout=60)
    assert post.status == 200
    assert (
        # The first line shows the prompt with its parameters, the seed included.
        re.match(r"\*\*slow delivery --seed \d+\*\* - ", post.json["content"])
        and f"<@{h.fake.user.id}>" in post.json["content"]
    )
    assert len(post.custom_ids()) == GRID_IDS


async def test_buttons_after_restart_generate(h: Harness) -> None:
    job, message = await grid(h, "before the restart")
    await h.restart_bot()
    press = await h.fake.press(f"mj:v:{job.id}:1", message)
    result = await press.wait_original(has_result, timeout=60)
    assert "Variations (Strong)" in result["content"]
    assert len(custom_ids(result)) == GRID_IDS
