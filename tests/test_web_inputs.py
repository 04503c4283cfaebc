"""Job pages show the pictures a job was made from, under the same visibility rules as its images."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image as PILImage
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from test_web import Seeder, fetch

from bot.models import JobInput
from bot.settings import BotSettings
from bot.signing import Signer, private_job_url
from bot.storage import LocalMediaStore
from bot.web import create_app

SECRET = b"test secret for signed gallery links"
OWNER = 1


def picture(size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    PILImage.new("RGB", size, color).save(out, "PNG")
    return out.getvalue()


@dataclass
class Scene:
    client: TestClient[Any, Any]
    signer: Signer
    blend: str  # public, two input pictures
    stealth: str  # stealth, one input picture
    running: str  # public but unfinished, one input picture


@pytest.fixture
async def scene(sessions: async_sessionmaker[AsyncSession], tmp_path: Path) -> AsyncIterator[Scene]:
    store = LocalMediaStore(tmp_path / "media")
    async with sessions() as session:
        seeder = Seeder(session, store)
        owner = await seeder.member(OWNER, "Alice")
        blend = await seeder.job(owner, "", kind="blend")
        stealth = await seeder.job(owner, "", kind="blend", visibility="stealth")
        running = await seeder.job(owner, "", kind="blend", status="running")
        pictures = [
            (blend.id, picture((30, 20), (200, 30, 30))),
            (blend.id, picture((20, 30), (30, 200, 30))),
            (stealth.id, picture((16, 16), (9, 9, 9))),
            (running.id, picture((16, 16), (9, 9, 90))),
        ]
        counts: dict[str, int] = {}
        for job_id, data in pictures:
            index = counts[job_id] = counts.get(job_id, -1) + 1
            key = f"inputs/test/{job_id}-{index}.png"
            await store.put(key, data, "image/png")
            session.add(JobInput(job_id=job_id, role="image", index=index, key=key))
        await session.commit()
        ids = blend.id, stealth.id, running.id
    signer = Signer(SECRET)
    settings = BotSettings(_env_file=None, media_dir=tmp_path / "media", public_url="https://g.example")
    async with TestClient(TestServer(create_app(sessions, store, settings, signer=signer))) as client:
        yield Scene(client, signer, *ids)


async def test_a_public_job_page_shows_its_input_pictures(scene: Scene) -> None:
    body = await fetch(scene.client, f"/j/{scene.blend}")
    assert f'src="/in/{scene.blend}/0.png"' in body and f'src="/in/{scene.blend}/1.png"' in body
    response = await scene.client.get(f"/in/{scene.blend}/1.png")
    assert response.status == 200 and response.headers["Content-Type"] == "image/png"
    assert PILImage.open(io.BytesIO(await response.read())).size == (20, 30)
    assert (await scene.client.get(f"/in/{scene.blend}/2.png")).status == 404


@pytest.mark.parametrize("which", ["stealth", "running"])
async def test_inputs_of_hidden_jobs_are_not_served(scene: Scene, which: str) -> None:
    job_id = getattr(scene, which)
    assert (await scene.client.get(f"/in/{job_id}/0.png")).status == 404


async def test_the_owners_private_link_shows_a_stealth_jobs_inputs(scene: Scene) -> None:
    url = private_job_url(scene.signer, "https://g.example", OWNER, scene.stealth)
    base = "/" + url.split("/", 3)[3]
    body = await fetch(scene.client, base)
    assert f'src="{base}/in/0.png"' in body
    response = await scene.client.get(f"{base}/in/0.png")
    assert response.status == 200
    assert PILImage.open(io.BytesIO(await response.read())).size == (16, 16)
    other = private_job_url(scene.signer, "https://g.example", OWNER + 1, scene.stealth)
    assert (await scene.client.get("/" + other.split("/", 3)[3] + "/in/0.png")).status == 404
