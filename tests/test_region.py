"""Vary (Region): the button answers only the image's owner, privately, with an editor link
signed for them; the editor's submit (the gallery's ``REGION_JOB_KEY`` callback) makes a charged
REGION job whose worker message carries the mask and the edited prompt, and its result is posted
in the channel mentioning the member; refusals come back as ``RegionRefused``."""

from __future__ import annotations

import asyncio
import base64
import io
import socket
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image as PILImage

from bot.__main__ import run
from bot.buttons import NOT_YOURS
from bot.models import Job, JobStatus
from bot.region import ACCEPTED, IMAGE_GONE, region_job_callback
from bot.signing import PURPOSE_REGION, Signer, region_editor_url
from bot.web.app import RegionRefused, create_app
from tests.botutil import (
    EPHEMERAL,
    FAKE_TOKEN,
    FakeDispatcher,
    Harness,
    bot_harness,
    credits_used,
    finish_grid,
    has_result,
    make_settings,
    press_and_wait,
)
from tests.fakes import FakeDiscord
from workers.schema import JobKind

pytestmark = pytest.mark.timeout(60)
SECRET = "region-test-secret-0123456789abcdef"
SIGNER = Signer(SECRET.encode())


@pytest.fixture
async def h(tmp_path: Path, sqlite_url: str) -> Any:
    """A bot over SQLite with a fake dispatcher, a known link secret and 2 credits a day."""
    async with bot_harness(
        tmp_path, sqlite_url, FakeDispatcher(), web_secret=SECRET, credit_limit=2
    ) as harness:
        yield harness


async def single_image(h: Harness, prompt: str) -> tuple[Job, dict[str, Any]]:
    """A grid, then U1 (free): the single image and its message."""
    grid, message = await finish_grid(h, prompt)
    press, _ = await press_and_wait(h, f"mj:u:{grid.id}:1", message)
    result = await press.wait_original(has_result)
    return await h.job_for(press), result


def mask_png(size: tuple[int, int]) -> bytes:
    """A mask marking the image's top-left quarter."""
    mask = PILImage.new("L", size, 0)
    mask.paste(255, (0, 0, size[0] // 2, size[1] // 2))
    out = io.BytesIO()
    mask.save(out, "PNG")
    return out.getvalue()


async def test_the_button_gives_the_owner_a_private_link_for_them(h: Harness) -> None:
    image, message = await single_image(h, "a garden")
    _, answer = await press_and_wait(h, f"mj:region:{image.id}", message)
    payload = answer.message_payload
    assert answer.callback_type == 4 and payload["flags"] & EPHEMERAL
    [link] = [c for row in payload["components"] for c in row["components"]]
    assert link["url"].startswith("http://gallery.test/edit/") and link["url"] in payload["content"]
    claims = SIGNER.verify(unquote(link["url"].rsplit("/", 1)[1]), PURPOSE_REGION)
    assert (claims.user_id, claims.job_id, claims.index) == (h.fake.user.id, image.id, 0)

    # The image is public, but the editor only opens for its owner: others are told so.
    bob = h.fake.add_member(h.fake.guild, "bob").user
    _, refused = await press_and_wait(h, f"mj:region:{image.id}", message, user=bob)
    assert refused.message_payload["content"] == NOT_YOURS
    assert "edit/" not in str(refused.message_payload)


async def test_the_editor_submit_makes_a_charged_region_job_posted_in_the_channel(h: Harness) -> None:
    image, _message = await single_image(h, "a garden")
    assert await credits_used(h, h.fake.user.id) == 1
    app = create_app(h.sessions, h.store, h.settings, signer=SIGNER, region_job=region_job_callback(h.bot))
    url = region_editor_url(SIGNER, "", h.fake.user.id, image.id, 0)
    mask = mask_png((64, 64))
    async with TestClient(TestServer(app)) as client:
        response = await client.post(
            url, json={"prompt": "a garden with a red door", "mask": base64.b64encode(mask).decode()}
        )
        assert response.status == 200, await response.text()
        assert (await response.json())["message"] == ACCEPTED

    await h.dispatcher.wait_sent(2)  # the grid, then the repaint (U1 is cut by the bot)
    request = h.dispatcher.sent[-1]
    job = await h.job(request.job_id)
    assert job.kind == JobKind.REGION and job.parent_id == image.id and job.user_id == h.fake.user.id
    assert job.cost == 1 and await credits_used(h, h.fake.user.id) == 2
    assert request.kind == JobKind.REGION and request.params.prompt == "a garden with a red door"
    assert request.input_image is not None and request.mask_image is not None
    stored_mask = PILImage.open(io.BytesIO(base64.b64decode(request.mask_image)))
    assert stored_mask.size == (64, 64) and stored_mask.getpixel((5, 5)) == 255
    assert stored_mask.getpixel((60, 60)) == 0

    h.dispatcher.succeed(job.id)
    mine = f":{job.id}"
    post = await h.fake.wait_for_request(
        lambda r: r.route == "channel_message_create" and r.status == 200 and mine in str(r.custom_ids())
    )
    assert f"<@{h.fake.user.id}>" in post.message_payload["content"]
    assert "Vary (Region)" in post.message_payload["content"] and post.files
    assert (await h.job(job.id)).status == JobStatus.DONE


async def test_refusals_come_back_as_region_refused(h: Harness) -> None:
    image, _message = await single_image(h, "a garden")
    create = region_job_callback(h.bot)
    mask_key = "masks/test.png"
    await h.store.put(mask_key, mask_png((64, 64)), "image/png")
    # Someone else's image, or one that does not exist: nothing to repaint.
    with pytest.raises(RegionRefused, match=IMAGE_GONE):
        await create(h.fake.user.id + 1, image.id, 0, "a door", mask_key)
    with pytest.raises(RegionRefused, match=IMAGE_GONE):
        await create(h.fake.user.id, "AAAAAAAAAAAAAAAAAAAAAA", 0, "a door", mask_key)
    # A prompt the parser refuses is explained.
    with pytest.raises(RegionRefused, match="--ar 0:1"):
        await create(h.fake.user.id, image.id, 0, "a door --ar 0:1", mask_key)
    count = await h.job_count()
    assert await create(h.fake.user.id, image.id, 0, "a door", mask_key) == ACCEPTED
    # The allowance (2) is spent now: the next edit is refused with the credits message.
    with pytest.raises(RegionRefused, match="credit"):
        await create(h.fake.user.id, image.id, 0, "a window", mask_key)
    assert await h.job_count() == count + 1 and await credits_used(h, h.fake.user.id) == 2


@pytest.mark.redis
async def test_python_m_bot_registers_the_region_callback_with_the_gallery(
    tmp_path: Path, redis_url: str
) -> None:
    """The gallery ``run()`` serves answers an editor submit (without the callback: 503)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = make_settings(
        tmp_path / "data",
        f"sqlite+aiosqlite:///{tmp_path / 'data' / 'mirage.db'}",
        broker_url=redis_url,
        result_backend=redis_url,
        web_port=port,
        web_secret=SECRET,
    )
    stop = asyncio.Event()
    async with FakeDiscord(token=FAKE_TOKEN) as fake:
        task = asyncio.create_task(run(settings, stop=stop))
        try:
            await fake.wait_until_connected(timeout=20)
            url = region_editor_url(SIGNER, f"http://127.0.0.1:{port}", 1, "AAAAAAAAAAAAAAAAAAAAAA", 0)
            async with aiohttp.ClientSession() as http, http.post(url, data="not json") as response:
                # Past the token and the callback checks: only the body's type is refused.
                assert response.status == 415
        finally:
            stop.set()
            await asyncio.wait_for(task, 20)
