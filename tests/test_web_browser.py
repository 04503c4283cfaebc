"""The gallery and the Vary (Region) editor in a real headless Chromium, driven over CDP.

Needs Debian's ``chromium`` package (/usr/bin/chromium, or MIRAGE_CHROMIUM). Without it the tests
skip, unless MIRAGE_REQUIRE_BROWSER=1 (CI), where a missing browser fails the run. Screenshots
go to ``artifacts/`` at the repository root (ignored by git); with MIRAGE_SCREENSHOTS=1 the
explore page and the editor are also saved as the README's pictures under ``docs/``.
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
from bot.favourites import toggle_favourite
from bot.media import save_job_images
from bot.models import Job, JobStatus, Member
from bot.settings import BotSettings
from bot.signing import PURPOSE_REGION, REGION_TTL, Signer, region_editor_url
from bot.storage import LocalMediaStore
from bot.web import create_app, start_web

CHROMIUM = Path(os.environ.get("MIRAGE_CHROMIUM", "/usr/bin/chromium"))
REQUIRE_BROWSER = os.environ.get("MIRAGE_REQUIRE_BROWSER") == "1"
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
DOCS = Path(__file__).resolve().parent.parent / "docs"
DOC_SCREENSHOTS = os.environ.get("MIRAGE_SCREENSHOTS") == "1"
TIME_LIMIT_S = 30
VIEWPORT = (1280, 900)

PUBLIC_PROMPTS = [
    "a lighthouse on a cliff at dusk, oil painting, dramatic clouds --ar 1:1",
    "bioluminescent jellyfish drifting through a neon city, cinematic",
    "a tiny fox asleep in a teacup, soft morning light, watercolor",
    "brutalist temple in a desert of pink sand, volumetric haze",
    "a paper boat on a rain-soaked street, macro photography",
    "isometric cozy library inside a hollow tree, warm light",
    "a red fox in fresh snow, telephoto, golden hour",
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


def art(seed: int, size: int, height: int | None = None) -> bytes:
    """A colourful, deterministic "generated" image: layered sine fields with a soft vignette."""
    width, height = size, height or size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    field = np.zeros((height, width))
    for _ in range(4):
        fx, fy = rng.uniform(1.5, 6, 2).tolist()
        phase = rng.uniform(0, 2 * np.pi)
        field += np.sin(2 * np.pi * (fx * x + phase)) * np.cos(2 * np.pi * fy * y - phase)
    field = (field - field.min()) / (np.ptp(field) + 1e-9)
    palette = rng.uniform(0, 1, (3, 3))  # per channel: offset, amplitude, frequency
    rgb = np.stack(
        [0.5 + 0.5 * np.cos(2 * np.pi * (palette[c, 2] * field + palette[c, 0])) for c in range(3)], axis=-1
    )
    vignette = 1 - 0.55 * (((x - x.mean()) ** 2 + (y - y.mean()) ** 2) * 2)
    rgb = np.clip(rgb * vignette[..., None] * 255, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    PILImage.fromarray(rgb, "RGB").save(out, "PNG", compress_level=1)
    return out.getvalue()


def grid_of(tiles: list[bytes]) -> bytes:
    """Four tiles as a 2x2 grid, like an imagine job's index 0."""
    images = [PILImage.open(io.BytesIO(t)) for t in tiles]
    width, height = images[0].size
    grid = PILImage.new("RGB", (width * 2, height * 2))
    for i, img in enumerate(images):
        grid.paste(img, ((i % 2) * width, (i // 2) * height))
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


# Tile sizes by job, so the masonry has landscape, square and portrait pictures to lay out.
TILE_SIZES = [((256, 256), [1, 1]), ((288, 192), [3, 2]), ((192, 288), [2, 3])]


def tile_size(n: int) -> tuple[int, int]:
    """The tile size of the n-th seeded job (stealth job included in the count)."""
    return TILE_SIZES[n % len(TILE_SIZES)][0]


async def seed(sessions: Any, store: LocalMediaStore) -> tuple[list[str], str, list[str]]:
    """Public jobs with real images (newest last), one stealth job, and a family under the oldest.

    Returns the public ids, the stealth id and the family members (an upscale and a variation of
    the oldest public grid), which also collect favourites.
    """
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
            (width, height), aspect = TILE_SIZES[n % len(TILE_SIZES)]
            job = Job(
                member_id=member.id,
                user_id=member.user_id,
                guild_id=1,
                channel_id=1,
                kind="imagine",
                prompt=prompt.removesuffix(" --ar 1:1"),
                params={"aspect": aspect, "stylize": 250, "chaos": 0},
                seed=4242 + n,
                engine="sdxl",
                visibility=visibility,
                status=JobStatus.DONE,
            )
            session.add(job)
            await session.flush()
            tiles = [await asyncio.to_thread(art, n * 10 + t, width, height) for t in range(4)]
            images = [(0, await asyncio.to_thread(grid_of, tiles)), *enumerate(tiles, start=1)]
            await save_job_images(store, session, job, images)
            if visibility == "public":
                public.append(job.id)
            else:
                stealth_id = job.id
            await session.commit()  # one commit per job: distinct created_at order

        oldest = await session.get(Job, public[0])
        assert oldest is not None
        family: list[str] = []
        for kind, index in (("crop", 2), ("variation", 3)):
            child = Job(
                member_id=oldest.member_id,
                user_id=oldest.user_id,
                guild_id=1,
                channel_id=1,
                kind=kind,
                parent_id=oldest.id,
                parent_index=index,
                prompt=oldest.prompt,
                params=oldest.params,
                seed=oldest.seed,
                engine="sdxl",
                visibility="public",
                status=JobStatus.DONE,
            )
            session.add(child)
            await session.flush()
            (width, height) = tile_size(0)
            if kind == "crop":
                images = [(0, await asyncio.to_thread(art, index, width, height))]
            else:
                tiles = [await asyncio.to_thread(art, 100 + t, width, height) for t in range(4)]
                images = [(0, await asyncio.to_thread(grid_of, tiles)), *enumerate(tiles, start=1)]
            await save_job_images(store, session, child, images)
            family.append(child.id)
            await session.commit()
        for member_id, job_id in ((bob.id, family[0]), (alice.id, family[1]), (alice.id, public[2])):
            await toggle_favourite(session, member_id, job_id)
        await session.commit()
    return public, stealth_id, family


IMAGES_LOADED_JS = """(async () => {
    const imgs = [...document.querySelectorAll(%s)];
    await Promise.all(imgs.map(i => i.complete ? null : new Promise(r => {
        i.addEventListener('load', r); i.addEventListener('error', r); })));
    return imgs.map(i => ({src: i.getAttribute('src'), width: i.naturalWidth, height: i.naturalHeight,
                           job: i.closest('a') ? i.closest('a').dataset.job : null,
                           href: i.closest('a') ? i.closest('a').getAttribute('href') : null}));
})()"""

MASONRY_JS = """(() => {
    const cards = [...document.querySelectorAll('.masonry .card')].map(c => c.getBoundingClientRect());
    const imgs = [...document.querySelectorAll('.masonry a.tile img')].map(i => {
        const b = i.getBoundingClientRect();
        return {w: b.width, h: b.height, nw: i.naturalWidth, nh: i.naturalHeight};
    });
    return {columns: new Set(cards.map(b => Math.round(b.left))).size, imgs};
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


async def check_gallery(
    cdp: DevTools, base: str, public: list[str], stealth_id: str, family: list[str]
) -> None:
    """Explore → hover → click a picture → job page → stealth 404, with screenshots on the way."""
    page = await open_page(cdp)

    # Explore: one entry per family, newest first, every picture decoded, the stealth job nowhere.
    await navigate(cdp, page, f"{base}/")
    tiles = await images(cdp, page, "a.tile img")
    assert [t["job"] for t in tiles] == public[::-1]
    for tile in tiles:
        assert tile["width"] > 0 and tile["height"] > 0, tile
        assert tile["href"] == f"/j/{tile['job']}"
    # The oldest grid carries its upscale and variation underneath.
    kids = await images(cdp, page, f'article[data-job="{public[0]}"] a.kid img')
    assert [k["job"] for k in kids] == family and all(k["width"] > 0 for k in kids)
    html = await cdp.evaluate(page, "document.documentElement.outerHTML")
    assert stealth_id not in html and "unreleased product" not in html
    # The hostile prompt is shown as text; no script exists on the page, let alone ran.
    assert await cdp.evaluate(page, "document.scripts.length") == 0
    captions = await cdp.evaluate(page, "[...document.querySelectorAll('.cap .p')].map(e => e.textContent)")
    assert any(c.startswith("<script>alert('x')</script> hostile prompt stays text --") for c in captions)
    assert all("--stylize 250 --seed " in c for c in captions)
    # Masonry: several columns, each picture at its own aspect ratio (nothing cropped square).
    layout = await cdp.evaluate(page, MASONRY_JS)
    assert layout["columns"] >= 3
    ratios = {round(i["nw"] / i["nh"], 2) for i in layout["imgs"]}
    assert ratios == {1.0, 1.5, round(2 / 3, 2)}
    for shown in layout["imgs"]:
        assert abs(shown["w"] / shown["h"] - shown["nw"] / shown["nh"]) < 0.02, shown
    # Favourites are counted per family.
    counts = await cdp.evaluate(page, "[...document.querySelectorAll('.card .fav')].map(e => e.textContent)")
    favourites = {public[0]: 2, public[2]: 1}  # the oldest counts its upscale's and variation's
    assert counts == [f"❤️ {favourites.get(job, 0)}" for job in public[::-1]]

    # Hovering a picture reveals its prompt line.
    target_job = public[-2]
    tile_selector = f'a.tile[data-job="{target_job}"]'
    caption_opacity = f"getComputedStyle(document.querySelector('{tile_selector} .cap')).opacity"
    assert float(await cdp.evaluate(page, caption_opacity)) < 0.1
    point = await center_of(cdp, page, tile_selector)
    await cdp.send("Input.dispatchMouseEvent", {"type": "mouseMoved", **point}, page)
    # Wait for the fade-in to finish, frame by frame, rather than for a fixed time.
    cap = json.dumps(f"{tile_selector} .cap")
    await cdp.evaluate(
        page,
        f"new Promise(r => {{ const c = document.querySelector({cap});"
        " const done = () => getComputedStyle(c).opacity === '1' ? r() : requestAnimationFrame(done);"
        " done(); })",
    )
    await screenshot(cdp, page, ARTIFACTS / "gallery.png")
    if DOC_SCREENSHOTS:
        await screenshot(cdp, page, DOCS / "gallery-explore.png")

    # Click the picture like a person would, and land on its job page.
    loaded = cdp.event("Page.loadEventFired", page)
    await click(cdp, page, point)
    await asyncio.wait_for(loaded, 10)
    assert await cdp.evaluate(page, "location.href") == f"{base}/j/{target_job}"
    assert (
        await cdp.evaluate(page, "document.querySelector('.prompt .text').textContent") == PUBLIC_PROMPTS[-2]
    )
    seed_number = 4242 + len(PUBLIC_PROMPTS) - 1
    params = await cdp.evaluate(
        page, "[...document.querySelectorAll('.prompt .param')].map(e => e.textContent)"
    )
    assert params == ["--ar 2:3", "--stylize 250", f"--seed {seed_number}"]
    shown = await images(cdp, page, "main img")
    width, height = tile_size(len(PUBLIC_PROMPTS) - 1)
    assert shown[0]["src"] == f"/i/{target_job}/0.png"
    assert (shown[0]["width"], shown[0]["height"]) == (2 * width, 2 * height)
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
    public, stealth_id, family = await seed(sessions, store)

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
                await check_gallery(cdp, base, public, stealth_id, family)
            finally:
                await cdp.close()
    finally:
        await runner.cleanup()
        await engine.dispose()
    elapsed = time.monotonic() - started
    assert elapsed < TIME_LIMIT_S, f"browser test took {elapsed:.1f}s"


EDITOR_IMAGE = (512, 384)  # an upscale at 4:3, so screen and image coordinates differ on both axes
EDITOR_SECRET = b"browser test secret, long enough"


async def seed_upscale(sessions: Any, store: LocalMediaStore) -> str:
    """One stealth upscale (a single 4:3 image) of the member with user id 7; returns its id."""
    async with sessions() as session:
        owner = Member(guild_id=1, user_id=7, display_name="Dana")
        session.add(owner)
        await session.flush()
        job = Job(
            member_id=owner.id,
            user_id=owner.user_id,
            guild_id=1,
            channel_id=1,
            kind="crop",
            prompt="a koi pond at night, lanterns, ukiyo-e",
            params={"aspect": [4, 3], "stylize": 100},
            seed=77,
            engine="sdxl",
            visibility="stealth",
            status=JobStatus.DONE,
        )
        session.add(job)
        await session.flush()
        picture = await asyncio.to_thread(art, 5, *EDITOR_IMAGE)
        await save_job_images(store, session, job, [(0, picture)])
        await session.commit()
        return job.id


async def drag(
    cdp: DevTools, page: str, start: dict[str, float], end: dict[str, float], steps: int = 8
) -> None:
    """Press the left button at ``start``, move to ``end`` in steps, release: pointer events."""
    await cdp.send(
        "Input.dispatchMouseEvent",
        {"type": "mousePressed", **start, "button": "left", "buttons": 1, "clickCount": 1},
        page,
    )
    for step in range(1, steps + 1):
        at = {k: start[k] + (end[k] - start[k]) * step / steps for k in ("x", "y")}
        await cdp.send(
            "Input.dispatchMouseEvent", {"type": "mouseMoved", **at, "button": "left", "buttons": 1}, page
        )
    await cdp.send(
        "Input.dispatchMouseEvent",
        {"type": "mouseReleased", **end, "button": "left", "buttons": 0, "clickCount": 1},
        page,
    )


STATUS_OK_JS = """new Promise(r => {
    const s = document.getElementById('status');
    const done = () => /\\b(ok|bad)\\b/.test(s.className) ? r([s.className, s.textContent])
                                                       : requestAnimationFrame(done);
    done();
})"""


async def check_editor(
    cdp: DevTools, base: str, token: str, calls: list[tuple[int, str, int, str, str]], called: asyncio.Event
) -> tuple[float, float, float, float]:
    """Draw a rectangle on the picture, edit the prompt, submit; returns the rectangle (0-1 units)."""
    page = await open_page(cdp)
    await navigate(cdp, page, f"{base}/edit/{token}")
    picture = await images(cdp, page, "#picture")
    assert (picture[0]["width"], picture[0]["height"]) == EDITOR_IMAGE
    assert await cdp.evaluate(page, "document.getElementById('submit').disabled") is True

    box = await cdp.evaluate(
        page,
        "(() => { const b = document.getElementById('overlay').getBoundingClientRect();"
        " return {x: b.x, y: b.y, w: b.width, h: b.height}; })()",
    )
    assert abs(box["w"] / box["h"] - EDITOR_IMAGE[0] / EDITOR_IMAGE[1]) < 0.01

    def at(fx: float, fy: float) -> dict[str, float]:
        return {"x": box["x"] + fx * box["w"], "y": box["y"] + fy * box["h"]}

    async def marked(fx: float, fy: float) -> bool:
        # The overlay tints what is selected; its alpha at a point says whether it is marked.
        x, y = int(fx * EDITOR_IMAGE[0]), int(fy * EDITOR_IMAGE[1])
        return await cdp.evaluate(
            page,
            f"document.getElementById('overlay').getContext('2d').getImageData({x}, {y}, 1, 1).data[3] > 0",
        )

    # Lasso: a triangle drawn point by point is filled; Undo takes it back.
    await click(cdp, page, await center_of(cdp, page, "#tool-lasso"))
    await drag(cdp, page, at(0.1, 0.1), at(0.3, 0.1), steps=4)
    assert not await marked(0.2, 0.14)  # a lasso is only filled once it closes
    await cdp.send(
        "Input.dispatchMouseEvent",
        {"type": "mousePressed", **at(0.1, 0.1), "button": "left", "buttons": 1, "clickCount": 1},
        page,
    )
    for point in (at(0.3, 0.1), at(0.2, 0.3)):
        await cdp.send(
            "Input.dispatchMouseEvent", {"type": "mouseMoved", **point, "button": "left", "buttons": 1}, page
        )
    await cdp.send(
        "Input.dispatchMouseEvent",
        {"type": "mouseReleased", **at(0.2, 0.3), "button": "left", "buttons": 0, "clickCount": 1},
        page,
    )
    assert await marked(0.2, 0.17) and not await marked(0.5, 0.5)
    await click(cdp, page, await center_of(cdp, page, "#undo"))
    assert not await marked(0.2, 0.17)
    # Brush: a stroke marks the path it went along; Clear removes everything.
    await click(cdp, page, await center_of(cdp, page, "#tool-brush"))
    await drag(cdp, page, at(0.7, 0.1), at(0.9, 0.1))
    assert await marked(0.8, 0.1) and not await marked(0.8, 0.4)
    await click(cdp, page, await center_of(cdp, page, "#clear"))
    assert not await marked(0.8, 0.1)
    assert await cdp.evaluate(page, "document.getElementById('submit').disabled") is True

    await click(cdp, page, await center_of(cdp, page, "#tool-rect"))
    rect = (0.2, 0.25, 0.65, 0.8)  # left, top, right, bottom as fractions of the picture
    start = {"x": box["x"] + rect[0] * box["w"], "y": box["y"] + rect[1] * box["h"]}
    end = {"x": box["x"] + rect[2] * box["w"], "y": box["y"] + rect[3] * box["h"]}
    await drag(cdp, page, start, end)  # the rectangle tool is selected by default
    assert await cdp.evaluate(page, "document.getElementById('submit').disabled") is False

    await cdp.evaluate(
        page,
        "(() => { const t = document.getElementById('prompt'); t.value = 'a glowing paper lantern';"
        " t.dispatchEvent(new Event('input')); })()",
    )
    await screenshot(cdp, page, ARTIFACTS / "region-editor.png")
    if DOC_SCREENSHOTS:
        await screenshot(cdp, page, DOCS / "region-editor.png")

    await click(cdp, page, await center_of(cdp, page, "#submit"))
    await asyncio.wait_for(called.wait(), 10)
    state, text = await cdp.evaluate(page, STATUS_OK_JS)
    assert "ok" in state and text == "Submitted — the result will appear in the channel"
    assert await cdp.evaluate(page, "document.getElementById('submit').disabled") is True
    assert len(calls) == 1

    # Links that are forged or expired open an error page, not the editor.
    middle = len(token) - 10  # inside the signature, where every bit counts
    forged = token[:middle] + ("A" if token[middle] != "A" else "B") + token[middle + 1 :]
    for bad in (forged, expired_token(token)):
        await navigate(cdp, page, f"{base}/edit/{bad}")
        assert "invalid or has expired" in await cdp.evaluate(page, "document.body.innerText")
        assert await cdp.evaluate(page, "document.getElementById('overlay')") is None
    return rect


def expired_token(token: str) -> str:
    """A correctly signed token for the same image whose 30 minutes are over."""
    claims = Signer(EDITOR_SECRET).verify(token, PURPOSE_REGION)
    past = Signer(EDITOR_SECRET, clock=lambda: time.time() - REGION_TTL.total_seconds() - 5)
    return past.sign(PURPOSE_REGION, claims.user_id, claims.job_id, claims.index, REGION_TTL)


@pytest.mark.timeout(90)
async def test_region_editor_in_headless_chromium(sqlite_url: str, tmp_path: Path) -> None:
    binary = chromium_or_skip()
    await asyncio.to_thread(upgrade, sqlite_url)
    engine = make_engine(sqlite_url)
    store = LocalMediaStore(tmp_path / "media")
    sessions = make_sessionmaker(engine)
    job_id = await seed_upscale(sessions, store)

    calls: list[tuple[int, str, int, str, str]] = []
    called = asyncio.Event()

    async def region_job(user_id: int, job: str, index: int, prompt: str, mask_key: str) -> str:
        calls.append((user_id, job, index, prompt, mask_key))
        called.set()
        return "Submitted — the result will appear in the channel"

    signer = Signer(EDITOR_SECRET)
    settings = BotSettings(media_dir=tmp_path / "media", public_url="http://127.0.0.1")
    app = create_app(sessions, store, settings, signer=signer, region_job=region_job)
    runner = await start_web(app, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    token = region_editor_url(signer, base, 7, job_id, 0).rsplit("/", 1)[1]
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        async with (
            launch_chromium(binary, tmp_path / "chromium-profile") as ws_url,
            aiohttp.ClientSession() as http,
            http.ws_connect(ws_url, max_msg_size=0) as ws,
        ):
            cdp = DevTools(ws)
            try:
                left, top, right, bottom = await check_editor(cdp, base, token, calls, called)
            finally:
                await cdp.close()
            async with http.get(f"{base}/edit/{expired_token(token)}") as refused:
                assert refused.status == 403
    finally:
        await runner.cleanup()
        await engine.dispose()

    [(user_id, got_job, index, prompt, mask_key)] = calls
    assert (user_id, got_job, index, prompt) == (7, job_id, 0, "a glowing paper lantern")
    with PILImage.open(io.BytesIO(await store.get(mask_key))) as img:
        assert img.size == EDITOR_IMAGE and img.mode == "L"
        mask = np.asarray(img)
    width, height = EDITOR_IMAGE
    x0, x1, y0, y1 = left * width, right * width, top * height, bottom * height
    ys, xs = np.mgrid[0:height, 0:width]
    margin = 3  # pixels at the edge may round either way
    inside = (xs > x0 + margin) & (xs < x1 - margin) & (ys > y0 + margin) & (ys < y1 - margin)
    outside = (xs < x0 - margin) | (xs > x1 + margin) | (ys < y0 - margin) | (ys > y1 + margin)
    assert set(np.unique(mask)) <= {0, 255}
    assert (mask[inside] == 255).all()
    assert (mask[outside] == 0).all()
