"""The gallery in a real headless Chromium, driven over the Chrome DevTools Protocol.

Needs Debian's ``chromium`` package (/usr/bin/chromium, or MIRAGE_CHROMIUM). Without it the test
skips, unless MIRAGE_REQUIRE_BROWSER=1 (CI), where a missing browser fails the run. Screenshots
go to ``artifacts/`` at the repository root.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from PIL import Image as PILImage

from bot.database import make_engine, make_sessionmaker, upgrade
from bot.media import save_job_images
from bot.models import Job, JobStatus, Member
from bot.settings import BotSettings
from bot.storage import LocalMediaStore
from bot.web import create_app, start_web

CHROMIUM = Path(os.environ.get("MIRAGE_CHROMIUM", "/usr/bin/chromium"))
REQUIRE_BROWSER = os.environ.get("MIRAGE_REQUIRE_BROWSER") == "1"
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
TIME_LIMIT_S = 30
VIEWPORT = (1280, 900)

PUBLIC_PROMPTS = [
    "a lighthouse on a cliff at dusk, oil painting, dramatic clouds --ar 1:1",
    "bioluminescent jellyfish drifting through a neon city, cinematic",
    "a tiny fox asleep in a teacup, soft morning light, watercolor",
    "brutalist temple in a desert of pink sand, volumetric haze",
    "portrait of an astronaut made of stained glass, intricate",
    "<script>alert('x')</script> hostile prompt stays text",
]
STEALTH_PROMPT = "stealth: unreleased product render, do not share"


def chromium_or_skip() -> Path:
    """The browser binary, or skip (fail under MIRAGE_REQUIRE_BROWSER=1) when it is missing."""
    if CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    reason = f"headless Chromium not found at {CHROMIUM} (apt-get install chromium)"
    if REQUIRE_BROWSER:
        pytest.fail(f"{reason}; MIRAGE_REQUIRE_BROWSER=1 requires it")
    pytest.skip(reason)


def art(seed: int, size: int) -> bytes:
    """A colourful, deterministic "generated" image: layered sine fields with a soft vignette."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    field = np.zeros((size, size))
    for _ in range(4):
        fx, fy = rng.uniform(1.5, 6, 2).tolist()
        phase = rng.uniform(0, 2 * np.pi)
        field += np.sin(2 * np.pi * (fx * x + phase)) * np.cos(2 * np.pi * fy * y - phase)
    field = (field - field.min()) / (np.ptp(field) + 1e-9)
    palette = rng.uniform(0, 1, (3, 3))  # per channel: offset, amplitude, frequency
    rgb = np.stack(
        [0.5 + 0.5 * np.cos(2 * np.pi * (palette[c, 2] * field + palette[c, 0])) for c in range(3)], axis=-1
    )
    vignette = 1 - 0.55 * (((x - 0.5) ** 2 + (y - 0.5) ** 2) * 2)
    rgb = np.clip(rgb * vignette[..., None] * 255, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    PILImage.fromarray(rgb, "RGB").save(out, "PNG", compress_level=1)
    return out.getvalue()


def grid_of(tiles: list[bytes]) -> bytes:
    """Four tiles as a 2x2 grid, like an imagine job's index 0."""
    images = [PILImage.open(io.BytesIO(t)) for t in tiles]
    side = images[0].width
    grid = PILImage.new("RGB", (side * 2, side * 2))
    for i, img in enumerate(images):
        grid.paste(img, ((i % 2) * side, (i // 2) * side))
    out = io.BytesIO()
    grid.save(out, "PNG", compress_level=1)
    return out.getvalue()


class DevTools:
    """A minimal Chrome DevTools Protocol client over one browser websocket (flattened sessions)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._next_id = 0
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._waiters: list[tuple[str, str | None, asyncio.Future[dict[str, Any]]]] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(message.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is None or future.done():
                    continue
                if "error" in data:
                    future.set_exception(RuntimeError(f"CDP error: {data['error']}"))
                else:
                    future.set_result(data.get("result", {}))
                continue
            for waiter in list(self._waiters):
                method, session_id, future = waiter
                if data.get("method") == method and session_id in (None, data.get("sessionId")):
                    self._waiters.remove(waiter)
                    if not future.done():
                        future.set_result(data.get("params", {}))
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError("DevTools connection closed"))

    async def send(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None
    ) -> Any:
        """Call a CDP method and wait for its result."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[self._next_id] = future
        await self.ws.send_str(json.dumps(message))
        return await future

    def event(self, method: str, session: str | None = None) -> asyncio.Future[dict[str, Any]]:
        """A future for the next ``method`` event; create it before the action that fires it."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters.append((method, session, future))
        return future

    async def evaluate(self, session: str, expression: str) -> Any:
        """Evaluate JavaScript in the page (DevTools is not bound by the page's CSP)."""
        result = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
            session,
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def close(self) -> None:
        """Stop reading and close the socket."""
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self.ws.close()


@contextlib.asynccontextmanager
async def launch_chromium(binary: Path, profile: Path) -> AsyncIterator[str]:
    """Start headless Chromium and yield its browser DevTools websocket URL."""
    proc = await asyncio.create_subprocess_exec(
        str(binary),
        "--headless",
        "--no-sandbox",  # the test may run as root in a container
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--no-proxy-server",
        "--hide-scrollbars",
        "--mute-audio",
        f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}",
        f"--user-data-dir={profile}",
        "--remote-debugging-port=0",
        "about:blank",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    drain: asyncio.Task[None] | None = None
    try:
        lines: list[str] = []
        url = None
        async with asyncio.timeout(15):
            while url is None:
                raw = await proc.stderr.readline()
                if not raw:
                    raise RuntimeError("Chromium exited before DevTools started:\n" + "".join(lines[-20:]))
                line = raw.decode(errors="replace")
                lines.append(line)
                match = re.search(r"DevTools listening on (ws://\S+)", line)
                if match:
                    url = match.group(1)

        async def _drain() -> None:
            # Chromium keeps logging to stderr; an unread pipe would eventually block it.
            assert proc.stderr is not None
            while await proc.stderr.readline():
                pass

        drain = asyncio.create_task(_drain())
        yield url
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if drain is not None:
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain


async def seed(sessions: Any, store: LocalMediaStore) -> tuple[list[str], str]:
    """Public jobs with real images (newest last) and one stealth job; returns their ids."""
    async with sessions() as session:
        alice = Member(guild_id=1, user_id=1, display_name="Alice")
        bob = Member(guild_id=1, user_id=2, display_name="Bob")
        session.add_all([alice, bob])
        await session.flush()
        public: list[str] = []
        stealth_id = ""
        specs = [(p, "public", alice if i % 2 else bob) for i, p in enumerate(PUBLIC_PROMPTS)]
        specs.insert(3, (STEALTH_PROMPT, "stealth", alice))
        for n, (prompt, visibility, member) in enumerate(specs):
            job = Job(
                member_id=member.id,
                user_id=member.user_id,
                guild_id=1,
                channel_id=1,
                kind="imagine",
                prompt=prompt,
                params={"aspect": [1, 1], "stylize": 100, "chaos": 0},
                seed=4242 + n,
                engine="sdxl",
                visibility=visibility,
                status=JobStatus.DONE,
            )
            session.add(job)
            await session.flush()
            tiles = [await asyncio.to_thread(art, n * 10 + t, 256) for t in range(4)]
            images = [(0, await asyncio.to_thread(grid_of, tiles)), *enumerate(tiles, start=1)]
            await save_job_images(store, session, job, images)
            if visibility == "public":
                public.append(job.id)
            else:
                stealth_id = job.id
            await session.commit()  # one commit per job: distinct created_at order
    return public, stealth_id


IMAGES_LOADED_JS = """(async () => {
    const imgs = [...document.querySelectorAll(%s)];
    await Promise.all(imgs.map(i => i.complete ? null : new Promise(r => {
        i.addEventListener('load', r); i.addEventListener('error', r); })));
    return imgs.map(i => ({src: i.getAttribute('src'), width: i.naturalWidth, height: i.naturalHeight,
                           job: i.closest('a') ? i.closest('a').dataset.job : null,
                           href: i.closest('a') ? i.closest('a').getAttribute('href') : null}));
})()"""

TILE_LAYOUT_JS = """(() => {
    const r = [...document.querySelectorAll('a.tile')].map(a => a.getBoundingClientRect());
    return {cols: r.filter(b => Math.abs(b.top - r[0].top) < 1).length, w: r[0].width, h: r[0].height};
})()"""


async def navigate(cdp: DevTools, page: str, url: str) -> None:
    """Open ``url`` and wait for its load event."""
    loaded = cdp.event("Page.loadEventFired", page)
    await cdp.send("Page.navigate", {"url": url}, page)
    await asyncio.wait_for(loaded, 10)


async def images(cdp: DevTools, page: str, selector: str) -> list[dict[str, Any]]:
    """The images matching ``selector`` once each has loaded or failed, with natural sizes."""
    return await cdp.evaluate(page, IMAGES_LOADED_JS % json.dumps(selector))


async def center_of(cdp: DevTools, page: str, selector: str) -> dict[str, float]:
    """The viewport coordinates of the centre of the element matching ``selector``."""
    return await cdp.evaluate(
        page,
        f"(() => {{ const b = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
        " return {x: b.x + b.width / 2, y: b.y + b.height / 2}; })()",
    )


async def click(cdp: DevTools, page: str, point: dict[str, float]) -> None:
    """A real left click (press and release) at ``point``."""
    for kind in ("mousePressed", "mouseReleased"):
        await cdp.send(
            "Input.dispatchMouseEvent", {"type": kind, **point, "button": "left", "clickCount": 1}, page
        )


async def screenshot(cdp: DevTools, page: str, path: Path) -> None:
    """Save a PNG screenshot of the viewport."""
    shot = await cdp.send("Page.captureScreenshot", {"format": "png"}, page)
    await asyncio.to_thread(path.write_bytes, base64.b64decode(shot["data"]))


async def open_page(cdp: DevTools) -> str:
    """A new tab at the test's viewport size; returns its flattened session id."""
    target = await cdp.send("Target.createTarget", {"url": "about:blank"})
    attached = await cdp.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
    page: str = attached["sessionId"]
    await cdp.send("Page.enable", session=page)
    metrics = {"width": VIEWPORT[0], "height": VIEWPORT[1], "deviceScaleFactor": 1, "mobile": False}
    await cdp.send("Emulation.setDeviceMetricsOverride", metrics, page)
    return page


async def check_gallery(cdp: DevTools, base: str, public: list[str], stealth_id: str) -> None:
    """Feed → hover → click a thumbnail → job page → stealth 404, with screenshots on the way."""
    page = await open_page(cdp)

    # The feed: every public job's thumbnail decoded, newest first, the stealth job nowhere.
    await navigate(cdp, page, f"{base}/")
    tiles = await images(cdp, page, "a.tile img")
    assert [t["job"] for t in tiles] == public[::-1]
    for tile in tiles:
        assert tile["width"] > 0 and tile["height"] > 0, tile
        assert tile["href"] == f"/j/{tile['job']}"
    html = await cdp.evaluate(page, "document.documentElement.outerHTML")
    assert stealth_id not in html and "unreleased product" not in html
    # The hostile prompt is shown as text; no script exists on the page, let alone ran.
    assert await cdp.evaluate(page, "document.scripts.length") == 0
    captions = await cdp.evaluate(page, "[...document.querySelectorAll('.cap .p')].map(e => e.textContent)")
    assert "<script>alert('x')</script> hostile prompt stays text" in captions
    # Square tiles, several to a row at desktop width.
    layout = await cdp.evaluate(page, TILE_LAYOUT_JS)
    assert layout["cols"] >= 4
    assert abs(layout["w"] - layout["h"]) < 1.5

    # Hovering a tile reveals its prompt.
    target_job = public[-2]
    tile_selector = f'a.tile[data-job="{target_job}"]'
    caption_opacity = f"getComputedStyle(document.querySelector('{tile_selector} .cap')).opacity"
    assert float(await cdp.evaluate(page, caption_opacity)) < 0.1
    point = await center_of(cdp, page, tile_selector)
    await cdp.send("Input.dispatchMouseEvent", {"type": "mouseMoved", **point}, page)
    await asyncio.sleep(0.4)  # the caption fades in over 0.2 s
    assert float(await cdp.evaluate(page, caption_opacity)) > 0.9
    await screenshot(cdp, page, ARTIFACTS / "gallery.png")

    # Click the thumbnail like a person would, and land on its job page.
    loaded = cdp.event("Page.loadEventFired", page)
    await click(cdp, page, point)
    await asyncio.wait_for(loaded, 10)
    assert await cdp.evaluate(page, "location.href") == f"{base}/j/{target_job}"
    assert await cdp.evaluate(page, "document.querySelector('.prompt').textContent") == PUBLIC_PROMPTS[-2]
    details = await cdp.evaluate(page, "document.querySelector('dl.params').innerText")
    assert "sdxl" in details and str(4242 + len(PUBLIC_PROMPTS) - 1) in details
    shown = await images(cdp, page, "main img")
    assert shown[0]["src"] == f"/i/{target_job}/0.png" and shown[0]["width"] == 512
    assert [i["src"] for i in shown[1:]] == [f"/t/{target_job}/{i}.webp" for i in range(1, 5)]
    assert all(i["width"] > 0 for i in shown)
    downloads = await cdp.evaluate(
        page, "[...document.querySelectorAll('.downloads a')].map(a => a.getAttribute('href'))"
    )
    assert downloads == [f"/i/{target_job}/{i}.png" for i in range(5)]
    await screenshot(cdp, page, ARTIFACTS / "gallery-job.png")

    # A stealth job's page is a plain 404 in the browser too.
    await navigate(cdp, page, f"{base}/j/{stealth_id}")
    assert "Not found" in await cdp.evaluate(page, "document.body.innerText")
    assert "unreleased product" not in await cdp.evaluate(page, "document.documentElement.outerHTML")


@pytest.mark.timeout(90)
async def test_gallery_in_headless_chromium(sqlite_url: str, tmp_path: Path) -> None:
    binary = chromium_or_skip()
    started = time.monotonic()
    await asyncio.to_thread(upgrade, sqlite_url)
    engine = make_engine(sqlite_url)
    store = LocalMediaStore(tmp_path / "media")
    sessions = make_sessionmaker(engine)
    public, stealth_id = await seed(sessions, store)

    settings = BotSettings(media_dir=tmp_path / "media", public_url="http://127.0.0.1")
    runner = await start_web(create_app(sessions, store, settings), "127.0.0.1", 0)
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        async with (
            launch_chromium(binary, tmp_path / "chromium-profile") as ws_url,
            aiohttp.ClientSession() as http,
            http.ws_connect(ws_url, max_msg_size=0) as ws,
        ):
            cdp = DevTools(ws)
            try:
                await check_gallery(cdp, base, public, stealth_id)
            finally:
                await cdp.close()
    finally:
        await runner.cleanup()
        await engine.dispose()
    elapsed = time.monotonic() - started
    assert elapsed < TIME_LIMIT_S, f"browser test took {elapsed:.1f}s"
