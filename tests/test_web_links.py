"""Signed links in the gallery: private job pages and the Vary (Region) editor's server side."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image as PILImage
from PIL import ImageDraw
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from test_web import SECRET_TEXT, Seed, fetch, job_links, seed_gallery

from bot.settings import BotSettings
from bot.signing import (
    PRIVATE_JOB_TTL,
    PURPOSE_JOB,
    PURPOSE_REGION,
    REGION_TTL,
    Signer,
    private_job_url,
    region_editor_url,
)
from bot.storage import LocalMediaStore, MediaStoreError
from bot.web import REGION_JOB_KEY, create_app, editor, queries
from bot.web.app import RegionRefused

ALICE, BOB = 1, 2  # Discord user ids of the seeded members
SECRET = b"test secret for signed gallery links"
SUBMITTED = "Submitted — the result will appear in the channel"


class Clock:
    """A settable clock shared by the test's signer and the app's."""

    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Calls:
    """What the region callback received, and how it should answer."""

    received: list[tuple[int, str, int, str, str]] = field(default_factory=list)
    refuse: str | None = None
    crash: bool = False

    async def __call__(self, user_id: int, job_id: str, index: int, prompt: str, mask_key: str) -> str:
        self.received.append((user_id, job_id, index, prompt, mask_key))
        if self.refuse is not None:
            raise RegionRefused(self.refuse)
        if self.crash:
            raise RuntimeError("the queue is on fire")
        return SUBMITTED


@dataclass
class Env:
    """A running gallery with a signer, a region callback and the seeded scene."""

    client: TestClient[Any, Any]
    signer: Signer
    clock: Clock
    calls: Calls
    seed: Seed
    store: LocalMediaStore


@pytest.fixture
async def env(sessions: async_sessionmaker[AsyncSession], tmp_path: Path) -> AsyncIterator[Env]:
    """The gallery with a region callback over the standard scene."""
    store = LocalMediaStore(tmp_path / "media")
    seed = await seed_gallery(sessions, store)
    clock = Clock()
    signer = Signer(SECRET, clock=clock)
    calls = Calls()
    settings = BotSettings(_env_file=None, media_dir=tmp_path / "media", public_url="https://g.example")
    app = create_app(sessions, store, settings, signer=signer, region_job=calls)
    async with TestClient(TestServer(app)) as client:
        yield Env(client, signer, clock, calls, seed, store)


@pytest.fixture
async def bare_client(
    sessions: async_sessionmaker[AsyncSession], tmp_path: Path
) -> AsyncIterator[tuple[TestClient[Any, Any], Signer, Seed]]:
    """The gallery without a region callback (the Discord side has not wired one)."""
    store = LocalMediaStore(tmp_path / "media")
    seed = await seed_gallery(sessions, store)
    signer = Signer(SECRET)
    settings = BotSettings(_env_file=None, media_dir=tmp_path / "media")
    async with TestClient(TestServer(create_app(sessions, store, settings, signer=signer))) as client:
        yield client, signer, seed


def path_of(url: str) -> str:
    """The path of an absolute link."""
    return "/" + url.split("/", 3)[3]


def forge(token: str) -> str:
    """The token with one character of its signature changed."""
    head, mac = token.rsplit(".", 1)
    return f"{head}.{('A' if mac[0] != 'A' else 'B')}{mac[1:]}"


# --- private job pages ----------------------------------------------------------------------


async def test_private_link_opens_the_owners_stealth_job(env: Env) -> None:
    url = private_job_url(env.signer, "https://g.example", ALICE, env.seed.stealth)
    assert url.startswith("https://g.example/p/")
    response = await env.client.get(path_of(url))
    body = await response.text()
    assert response.status == 200, body[:300]
    assert "secret project falcon" in body
    assert response.headers["Cache-Control"] == "private, no-store"
    assert '<meta name="robots" content="noindex, nofollow">' in body
    assert "Private link" in body
    # Its images are served under the same token, never under the public routes.
    images = re.findall(r'src="(/p/[^"]+)"', body)
    assert images and all("/i/" in i or "/t/" in i for i in images)
    for image in images:
        got = await env.client.get(image)
        assert got.status == 200, image
        assert SECRET_TEXT.encode() not in await got.read()
    await fetch(env.client, f"/i/{env.seed.stealth}/0.png", 404)
    # The stealth job is still nowhere public.
    assert env.seed.stealth not in await fetch(env.client, "/")


async def test_private_link_for_someone_else_opens_nothing(env: Env) -> None:
    token = env.signer.sign(PURPOSE_JOB, BOB, env.seed.stealth, 0, PRIVATE_JOB_TTL)
    body = await fetch(env.client, f"/p/{token}", 404)
    assert "falcon" not in body
    await fetch(env.client, f"/p/{token}/i/0.png", 404)


async def test_private_link_of_an_unfinished_job_is_not_found(env: Env) -> None:
    token = env.signer.sign(PURPOSE_JOB, ALICE, env.seed.running, 0, PRIVATE_JOB_TTL)
    await fetch(env.client, f"/p/{token}", 404)


async def test_forged_expired_and_wrong_purpose_links_are_refused(env: Env) -> None:
    token = env.signer.sign(PURPOSE_JOB, ALICE, env.seed.stealth, 0, PRIVATE_JOB_TTL)
    region = env.signer.sign(PURPOSE_REGION, ALICE, env.seed.stealth, 0, REGION_TTL)
    other_key = Signer(b"some other deployment's secret").sign(
        PURPOSE_JOB, ALICE, env.seed.stealth, 0, PRIVATE_JOB_TTL
    )
    for bad in (forge(token), region, other_key, "v1.nonsense.token", "x" * 400):
        for path in (f"/p/{bad}", f"/p/{bad}/i/0.png", f"/p/{bad}/t/0.webp"):
            response = await env.client.get(path)
            body = await response.text()
            assert response.status == 403, path
            assert "invalid or has expired" in body
            assert "falcon" not in body
    env.clock.now += PRIVATE_JOB_TTL.total_seconds() + 1
    assert "invalid or has expired" in await fetch(env.client, f"/p/{token}", 403)


# --- the region editor page -----------------------------------------------------------------


async def test_editor_page_is_self_contained_and_scripted_from_the_app(env: Env) -> None:
    url = region_editor_url(env.signer, "https://g.example", ALICE, env.seed.stealth, 2)
    response = await env.client.get(path_of(url))
    body = await response.text()
    assert response.status == 200, body[:300]
    csp = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert response.headers["Cache-Control"] == "private, no-store"
    # One script, from the app; nothing inline, nothing from elsewhere.
    assert re.findall(r"<script[^>]*>", body) == ['<script src="/static/editor.js" defer>']
    assert "</script>" in body and re.search(r"<script[^>]*>[^<]+</script>", body) is None
    loads = re.findall(r'(?:src|href)="([^"]*)"', body)
    assert all(u.startswith("/") for u in loads), loads
    assert "secret project falcon" in body  # the prompt, editable
    assert 'width="64" height="64"' in body  # image 2 of the grid is a 64 px tile
    picture = re.search(r'<img id="picture" src="([^"]+)"', body)
    assert picture is not None
    got = await env.client.get(picture.group(1))
    assert got.status == 200
    with PILImage.open(io.BytesIO(await got.read())) as img:
        assert img.size == (64, 64)


async def test_gallery_pages_keep_no_script_policy(env: Env) -> None:
    for path in ("/", f"/j/{env.seed.grid}", "/top"):
        response = await env.client.get(path)
        assert "script-src" not in response.headers["Content-Security-Policy"]


async def test_editor_refuses_bad_links(env: Env) -> None:
    token = env.signer.sign(PURPOSE_REGION, ALICE, env.seed.stealth, 2, REGION_TTL)
    job_token = env.signer.sign(PURPOSE_JOB, ALICE, env.seed.stealth, 2, PRIVATE_JOB_TTL)
    for bad in (forge(token), job_token):
        assert "invalid or has expired" in await fetch(env.client, f"/edit/{bad}", 403)
        await fetch(env.client, f"/edit/{bad}/image.png", 403)
    # Someone else's job, or an image the job does not have, is simply not there.
    bobs = env.signer.sign(PURPOSE_REGION, ALICE, env.seed.bob_jobs[0], 1, REGION_TTL)
    await fetch(env.client, f"/edit/{bobs}", 404)
    missing = env.signer.sign(PURPOSE_REGION, ALICE, env.seed.stealth, 9, REGION_TTL)
    await fetch(env.client, f"/edit/{missing}", 404)
    env.clock.now += REGION_TTL.total_seconds()
    await fetch(env.client, f"/edit/{token}", 403)


# --- submitting a region --------------------------------------------------------------------


def mask_png(
    size: tuple[int, int] = (64, 64),
    box: tuple[int, int, int, int] | None = (8, 8, 31, 39),
    mode: str = "RGBA",
) -> bytes:
    """A canvas-style mask: opaque black with a white rectangle (inclusive corners)."""
    img = PILImage.new(mode, size, (0, 0, 0, 255) if mode == "RGBA" else 0)
    if box is not None:
        ImageDraw.Draw(img).rectangle(box, fill=(255, 255, 255, 255) if mode == "RGBA" else 255)
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


async def submit(
    client: TestClient[Any, Any], token: str, mask: bytes | str, prompt: Any = "a glass koi"
) -> Any:
    """POST an edit the way the editor's script does; returns (status, JSON answer)."""
    data = mask if isinstance(mask, str) else base64.b64encode(mask).decode()
    response = await client.post(f"/edit/{token}", json={"prompt": prompt, "mask": data})
    return response.status, await response.json()


async def test_submit_hands_a_clean_mask_to_the_callback(env: Env) -> None:
    token = env.signer.sign(PURPOSE_REGION, ALICE, env.seed.stealth, 2, REGION_TTL)
    status, answer = await submit(env.client, token, mask_png(), "  a koi made of glass  ")
    assert (status, answer) == (200, {"message": SUBMITTED})
    [(user_id, job_id, index, prompt, key)] = env.calls.received
    assert (user_id, job_id, index, prompt) == (ALICE, env.seed.stealth, 2, "a koi made of glass")
    assert key.startswith(f"masks/{env.seed.stealth}/2-") and key.endswith(".png")
    stored = await env.store.get(key)
    with PILImage.open(io.BytesIO(stored)) as img:
        assert (img.format, img.mode, img.size) == ("PNG", "L", (64, 64))
        assert not img.info.get("dpi") and not getattr(img, "text", {})
        pixels = img.load()
        assert pixels is not None
        for y in range(64):
            for x in range(64):
                inside = 8 <= x <= 31 and 8 <= y <= 39
                assert pixels[x, y] == (255 if inside else 0), (x, y)


async def test_grey_edges_and_transparency_are_made_black_and_white(env: Env) -> None:
    token = env.signer.sign(PURPOSE_REGION, ALICE, env.seed.stealth, 2, REGION_TTL)
    img = PILImage.new("RGBA", (64, 64), (0, 0, 0, 0))  # transparent: not marked
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0, 9, 63), fill=(255, 255, 255, 255))
    draw.rectangle((10, 0, 10, 63), fill=(200, 200, 200, 255))  # anti-aliased edge, mostly in
    draw.rectangle((11, 0, 11, 63), fill=(60, 60, 60, 255))  # mostly out
    out = io.BytesIO()
    img.save(out, "PNG")
    status, _ = await submit(env.client, token, out.getvalue())
    assert status == 200
    with PILImage.open(io.BytesIO(await env.store.get(env.calls.received[0][4]))) as mask:
        row = [mask.getpixel((x, 5)) for x in range(14)]
    assert row == [255] * 11 + [0] * 3


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (mask_png(size=(65, 64)), "must be 64×64 pixels"),
        (mask_png(box=None), "empty"),
        (mask_png(box=None, mode="L"), "empty"),
        (b"GIF89a not a png", "not a PNG"),
        (b"\x89PNG\r\n\x1a\n truncated", "not a readable PNG"),
        ("%%% not base64 %%%", "not a PNG"),
    ],
)
async def test_bad_masks_are_refused(env: Env, mask: bytes | str, message: str) -> None:
    token = env.signer.sign(PURPOSE_REGION, ALICE, env.seed.stealth, 2, REGION_TTL)
    status, answer = await submit(env.client, token, mask)
    assert status == 400 and message in answer["error"], answer
    assert env.calls.received == []


async def test_jpeg_masks_are_refused(env: Env) -> None:
    token = env.signer.sign(PURPOSE_REGION, ALICE, env.seed.stealth, 2, REGION_TTL)
    out = io.BytesIO()
    PILImage.new("RGB", (64, 64), "white").save(out, "JPEG")
    status, answer = await submit(env.client, token, out.getvalue())
    assert status == 400 and "not a PNG" in answer["error"]


async def test_bad_requests_are_refused(env: Env) -> None:
    token = env.signer.sign(PURPOSE_REGION, ALICE, env.seed.stealth, 2, REGION_TTL)
    for prompt in ("", "   ", None, 5, "x" * 4001):
        status, answer = await submit(env.client, token, mask_png(), prompt)
        assert status == 400 and answer["error"], prompt
    form = await env.client.post(f"/edit/{token}", data={"prompt": "p", "mask": "m"})
    assert form.status == 415
    broken = await env.client.post(
        f"/edit/{token}", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert broken.status == 400
    huge = await env.client.post(
        f"/edit/{token}", data=b"x" * (13 * 1024 * 1024), headers={"Content-Type": "application/json"}
    )
    assert huge.status == 413
    assert env.calls.received == []


async def test_a_submit_that_arrives_in_pieces_is_read_whole(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A body is read as it arrives: one read may return only its first part.
    token = env.signer.sign(PURPOSE_REGION, ALICE, env.seed.stealth, 2, REGION_TTL)
    mask = base64.b64encode(mask_png()).decode()
    body = json.dumps({"prompt": "a koi", "mask": mask}).encode()

    async def pieces(data: bytes) -> AsyncIterator[bytes]:
        for start in range(0, len(data), 100):
            yield data[start : start + 100]
            await asyncio.sleep(0.005)

    json_type = {"Content-Type": "application/json"}
    response = await env.client.post(f"/edit/{token}", data=pieces(body), headers=json_type)
    assert (response.status, await response.json()) == (200, {"message": SUBMITTED})
    # Without a Content-Length, the bound still holds while reading.
    monkeypatch.setattr(editor, "MAX_EDIT_BODY", len(body) - 1)
    response = await env.client.post(f"/edit/{token}", data=pieces(body), headers=json_type)
    assert response.status == 413
    assert len(env.calls.received) == 1


async def test_json_nested_too_deep_is_a_bad_request(env: Env) -> None:
    token = env.signer.sign(PURPOSE_REGION, ALICE, env.seed.stealth, 2, REGION_TTL)
    deep = b"[" * 100_000 + b"]" * 100_000
    response = await env.client.post(
        f"/edit/{token}", data=deep, headers={"Content-Type": "application/json"}
    )
    assert response.status == 400
    assert "not valid JSON" in (await response.json())["error"]
    assert env.calls.received == []


async def test_submit_with_a_bad_token_is_refused(env: Env) -> None:
    token = env.signer.sign(PURPOSE_REGION, ALICE, env.seed.stealth, 2, REGION_TTL)
    for bad in (forge(token), env.signer.sign(PURPOSE_JOB, ALICE, env.seed.stealth, 2, PRIVATE_JOB_TTL)):
        status, answer = await submit(env.client, bad, mask_png())
        assert status == 403 and "invalid or has expired" in answer["error"]
    env.clock.now += REGION_TTL.total_seconds() + 1
    status, _ = await submit(env.client, token, mask_png())
    assert status == 403
    assert env.calls.received == []


async def test_refusals_and_failures_of_the_callback_keep_no_mask(env: Env) -> None:
    token = env.signer.sign(PURPOSE_REGION, ALICE, env.seed.stealth, 2, REGION_TTL)
    env.calls.refuse = "You have no credits left this week."
    status, answer = await submit(env.client, token, mask_png())
    assert (status, answer) == (409, {"error": "You have no credits left this week."})
    env.calls.refuse, env.calls.crash = None, True
    status, answer = await submit(env.client, token, mask_png())
    assert status == 500 and "nothing was charged" in answer["error"]
    for *_, key in env.calls.received:
        assert not await env.store.exists(key)


async def test_a_store_outage_is_a_json_retry_and_never_changes_a_refusal(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = env.signer.sign(PURPOSE_REGION, ALICE, env.seed.stealth, 2, REGION_TTL)

    async def unreachable(*_args: Any, **_kwargs: Any) -> None:
        raise MediaStoreError("the bucket is unreachable")

    # The mask cannot be stored: nothing reaches the callback, and the editor gets JSON it can show.
    monkeypatch.setattr(env.store, "put", unreachable)
    response = await env.client.post(
        f"/edit/{token}", json={"prompt": "a koi", "mask": base64.b64encode(mask_png()).decode()}
    )
    assert response.status == 503 and response.headers["Retry-After"]
    assert "nothing was charged" in (await response.json())["error"] and not env.calls.received
    # Stored, then refused, and the clean-up delete fails: the member still reads the refusal.
    monkeypatch.undo()
    monkeypatch.setattr(env.store, "delete", unreachable)
    env.calls.refuse = "You have no credits left this week."
    status, answer = await submit(env.client, token, mask_png())
    assert (status, answer) == (409, {"error": "You have no credits left this week."})


async def test_without_a_callback_submit_says_so(
    bare_client: tuple[TestClient[Any, Any], Signer, Seed],
) -> None:
    client, signer, seed = bare_client
    assert REGION_JOB_KEY not in client.app
    token = signer.sign(PURPOSE_REGION, ALICE, seed.stealth, 2, REGION_TTL)
    await fetch(client, f"/edit/{token}")  # the page itself still opens
    status, answer = await submit(client, token, mask_png())
    assert status == 503
    assert "not available" in answer["error"]
    assert job_links(await fetch(client, "/"))  # the rest of the gallery is unaffected


async def test_links_made_by_another_process_verify(
    sessions: async_sessionmaker[AsyncSession], tmp_path: Path
) -> None:
    """The Discord side and the gallery each build a signer from the same settings."""
    store = LocalMediaStore(tmp_path / "media")
    seed = await seed_gallery(sessions, store)
    settings = BotSettings(_env_file=None, media_dir=tmp_path / "media", web_secret_file=tmp_path / "secret")
    from bot.signing import signer_from_settings

    url = private_job_url(signer_from_settings(settings), settings.public_url, ALICE, seed.stealth)
    async with TestClient(TestServer(create_app(sessions, store, settings))) as client:
        assert "falcon" in await fetch(client, path_of(url))
    assert timedelta(days=7) == PRIVATE_JOB_TTL


async def test_access_log_never_holds_a_link_token(
    sessions: async_sessionmaker[AsyncSession], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import aiohttp

    from bot.web import start_web

    store = LocalMediaStore(tmp_path / "media")
    seed = await seed_gallery(sessions, store)
    signer = Signer(SECRET)
    settings = BotSettings(_env_file=None, media_dir=tmp_path / "media")
    runner = await start_web(create_app(sessions, store, settings, signer=signer), "127.0.0.1", 0)
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    token = signer.sign(PURPOSE_JOB, ALICE, seed.stealth, 0, PRIVATE_JOB_TTL)
    edit = signer.sign(PURPOSE_REGION, ALICE, seed.stealth, 1, REGION_TTL)
    caplog.set_level("INFO", logger="aiohttp.access")
    try:
        async with aiohttp.ClientSession() as http:
            for path in (f"/p/{token}", f"/p/{token}/i/0.png", f"/edit/{edit}", "/?q=falcon"):
                async with http.get(base + path) as response:
                    assert response.status == 200, path
    finally:
        await runner.cleanup()
    lines = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert len(lines) == 4
    assert all(token not in line and edit not in line for line in lines)
    assert '"GET /p/<token>" 200' in lines[0] and '"GET /p/<token>/i/0.png" 200' in lines[1]
    assert '"GET /edit/<token>" 200' in lines[2] and '"GET /" 200' in lines[3]


async def test_the_error_log_never_holds_a_link_token(
    env: Env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(*args: Any) -> None:
        raise RuntimeError("the database fell over")

    monkeypatch.setattr(queries, "owned_job_view", broken)
    token = env.signer.sign(PURPOSE_JOB, ALICE, env.seed.stealth, 0, PRIVATE_JOB_TTL)
    with caplog.at_level("ERROR", logger="bot.web.app"):
        body = await fetch(env.client, f"/p/{token}", 500)
    assert "Something went wrong" in body and "fell over" not in body
    assert "unhandled error serving /p/<token>" in caplog.text
    assert token not in caplog.text
