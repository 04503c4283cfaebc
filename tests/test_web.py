"""The gallery web app on SQLite and PostgreSQL: routes, stealth, pagination, hostile input."""

from __future__ import annotations

import io
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image as PILImage
from PIL.PngImagePlugin import PngInfo
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.media import save_job_images
from bot.models import Job, JobStatus, Member
from bot.settings import BotSettings
from bot.storage import LocalMediaStore
from bot.web import PAGE_SIZE, create_app

HOSTILE_PROMPT = '<script>alert("pwned")</script><img src=x onerror=alert(1)> "quoted" & more'
HOSTILE_NAME = "<b onmouseover=alert(2)>Mallory</b>"
SECRET_TEXT = "secret-generation-metadata"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def png(size: tuple[int, int] = (96, 96), color: tuple[int, int, int] = (40, 90, 200)) -> bytes:
    """A PNG with generation metadata in a text chunk (the store must strip it)."""
    info = PngInfo()
    info.add_text("parameters", SECRET_TEXT)
    out = io.BytesIO()
    PILImage.new("RGB", size, color).save(out, "PNG", pnginfo=info)
    return out.getvalue()


@dataclass
class Seed:
    """Ids of the seeded rows, by role."""

    alice: str = ""  # public member
    bob: str = ""  # stealth-only member
    mallory: str = ""  # hostile display name
    grid: str = ""  # alice, public imagine grid with 4 tiles
    variation: str = ""  # alice, public variation of `grid`
    stealth: str = ""  # alice, stealth grid
    orphan: str = ""  # alice, public variation of `stealth`
    bob_jobs: list[str] = field(default_factory=list)  # stealth
    running: str = ""  # alice, public but not finished
    failed: str = ""  # alice, public but failed
    hostile: str = ""  # mallory, public, hostile prompt
    prompts: dict[str, str] = field(default_factory=dict)


class Seeder:
    """Adds members and jobs (with stored images) in one session."""

    def __init__(self, session: AsyncSession, store: LocalMediaStore) -> None:
        self.session = session
        self.store = store
        self.tick = 0

    async def member(self, user_id: int, name: str) -> Member:
        member = Member(guild_id=10, user_id=user_id, display_name=name)
        self.session.add(member)
        await self.session.flush()
        return member

    async def job(
        self,
        member: Member,
        prompt: str,
        *,
        visibility: str = "public",
        status: str = JobStatus.DONE,
        kind: str = "imagine",
        parent: Job | None = None,
        tiles: int = 4,
        **extra: Any,
    ) -> Job:
        self.tick += 1
        job = Job(
            member_id=member.id,
            user_id=member.user_id,
            guild_id=10,
            channel_id=20,
            kind=kind,
            parent_id=parent.id if parent else None,
            parent_index=2 if parent else None,
            prompt=prompt,
            params={"aspect": [1, 1], "stylize": 250, "chaos": 0, "negative_prompt": "blurry"},
            seed=1000 + self.tick,
            engine="sdxl",
            visibility=visibility,
            status=status,
            created_at=T0 + timedelta(minutes=self.tick),
            **extra,
        )
        self.session.add(job)
        await self.session.flush()
        if status == JobStatus.DONE:
            images = [(0, png((128, 128)))] + [
                (i, png((64, 64), (i * 50, 20, 90))) for i in range(1, tiles + 1)
            ]
            await save_job_images(self.store, self.session, job, images)
        return job


async def seed_gallery(sessions: async_sessionmaker[AsyncSession], store: LocalMediaStore) -> Seed:
    """The standard scene: public, stealth, unfinished and hostile jobs."""
    seed = Seed()
    async with sessions() as session:
        s = Seeder(session, store)
        alice = await s.member(1, "Alice")
        bob = await s.member(2, "Bob the Stealthy")
        mallory = await s.member(3, HOSTILE_NAME)
        grid = await s.job(alice, "a lighthouse at dusk, oil painting")
        variation = await s.job(alice, "a lighthouse at dusk, oil painting", kind="variation", parent=grid)
        stealth = await s.job(alice, "stealth prompt: secret project falcon", visibility="stealth")
        orphan = await s.job(
            alice, "public child of a hidden parent", kind="variation", parent=stealth, tiles=0
        )
        bob_jobs = [await s.job(bob, f"bob hidden prompt number {i}", visibility="stealth") for i in range(3)]
        running = await s.job(alice, "still running prompt", status=JobStatus.RUNNING)
        failed = await s.job(alice, "failed prompt", status=JobStatus.FAILED)
        hostile = await s.job(mallory, HOSTILE_PROMPT)
        await session.commit()
        seed.alice, seed.bob, seed.mallory = alice.public_id, bob.public_id, mallory.public_id
        seed.grid, seed.variation, seed.stealth, seed.orphan = grid.id, variation.id, stealth.id, orphan.id
        seed.bob_jobs = [j.id for j in bob_jobs]
        seed.running, seed.failed, seed.hostile = running.id, failed.id, hostile.id
        seed.prompts = {
            j.id: j.prompt for j in (grid, variation, stealth, orphan, *bob_jobs, running, failed, hostile)
        }
    return seed


@pytest.fixture
def store(tmp_path: Path) -> LocalMediaStore:
    """A local media store in the test's folder."""
    return LocalMediaStore(tmp_path / "media")


@pytest.fixture
async def client(
    sessions: async_sessionmaker[AsyncSession], store: LocalMediaStore, tmp_path: Path
) -> AsyncIterator[TestClient[Any, Any]]:
    """A test client for the gallery over an empty, migrated database."""
    settings = BotSettings(media_dir=tmp_path / "media", public_url="https://gallery.example")
    app = create_app(sessions, store, settings)
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


@pytest.fixture
async def seeded(sessions: async_sessionmaker[AsyncSession], store: LocalMediaStore) -> Seed:
    """The standard scene in the database and the store."""
    return await seed_gallery(sessions, store)


async def fetch(client: TestClient[Any, Any], path: str, status: int = 200) -> str:
    """GET ``path``, check the status, return the body as text."""
    response = await client.get(path)
    body = await response.text()
    assert response.status == status, (path, response.status, body[:500])
    return body


def job_links(body: str) -> list[str]:
    """Job ids linked from entries (one per family), in page order."""
    return re.findall(r'class="tile" href="/j/([A-Za-z0-9_-]+)"', body)


def family_links(body: str) -> list[str]:
    """Job ids linked from family strips under entries, in page order."""
    return re.findall(r'class="kid[^"]*" href="/j/([A-Za-z0-9_-]+)"', body)


def assert_hidden(body: str, seed: Seed, job_ids: list[str]) -> None:
    """None of these jobs' ids or prompts appear."""
    for job_id in job_ids:
        assert job_id not in body
        assert seed.prompts[job_id] not in body


# --- basics ---------------------------------------------------------------------------------


async def test_healthz(client: TestClient[Any, Any]) -> None:
    response = await client.get("/healthz")
    assert response.status == 200
    assert await response.text() == "ok"


async def test_security_headers(client: TestClient[Any, Any], seeded: Seed) -> None:
    for path in ("/", f"/j/{seeded.grid}", f"/t/{seeded.grid}/0.webp", "/nope"):
        response = await client.get(path)
        csp = response.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp
        assert "script-src" not in csp  # falls back to default-src 'none': no scripts at all
        assert "img-src 'self'" in csp
        assert "unsafe-inline" not in csp
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"] == "no-referrer"
        assert response.headers["X-Frame-Options"] == "DENY"


async def test_pages_are_self_contained(client: TestClient[Any, Any], seeded: Seed) -> None:
    for path in ("/", f"/j/{seeded.grid}", f"/m/{seeded.alice}"):
        body = await fetch(client, path)
        assert "<script" not in body
        # Nothing is loaded from another origin (og:image is metadata for link previews, not a load).
        loads = re.findall(r'(?:src|href)="([^"]*)"', body)
        assert loads
        assert all(url.startswith("/") or url.startswith("?") for url in loads), loads
        assert "@import" not in body and "url(" not in body


async def test_empty_gallery(client: TestClient[Any, Any]) -> None:
    body = await fetch(client, "/")
    assert "Nothing here yet" in body
    assert job_links(body) == []
    await fetch(client, "/?page=2", 404)


# --- feed -----------------------------------------------------------------------------------


async def test_feed_shows_only_public_finished_jobs(client: TestClient[Any, Any], seeded: Seed) -> None:
    body = await fetch(client, "/")
    links = job_links(body)
    # One entry per family, newest first; the stealth, running and failed jobs are absent.
    assert links == [seeded.hostile, seeded.orphan, seeded.grid]
    # The variation is listed under the grid it came from, not as an entry of its own.
    assert family_links(body) == [seeded.variation]
    assert_hidden(body, seeded, [seeded.stealth, *seeded.bob_jobs, seeded.running, seeded.failed])
    assert "Bob the Stealthy" not in body
    assert f'src="/t/{seeded.grid}/0.webp"' in body
    # The orphan has no grid: its tile is its first image, and the hidden parent is not linked.
    assert f'src="/t/{seeded.orphan}/0.webp"' in body


async def test_feed_pagination(
    client: TestClient[Any, Any], sessions: async_sessionmaker[AsyncSession], store: LocalMediaStore
) -> None:
    async with sessions() as session:
        s = Seeder(session, store)
        carol = await s.member(5, "Carol")
        public = []
        for i in range(30):
            public.append((await s.job(carol, f"public number {i}", tiles=0)).id)
            if i % 10 == 0:
                await s.job(carol, f"stealth number {i}", visibility="stealth", tiles=0)
        await session.commit()
    newest_first = public[::-1]

    first = await fetch(client, "/")
    assert job_links(first) == newest_first[:PAGE_SIZE] and PAGE_SIZE == 24
    assert 'rel="next" href="/?page=2"' in first
    assert 'rel="prev"' not in first

    second = await fetch(client, "/?page=2")
    assert job_links(second) == newest_first[PAGE_SIZE:]
    assert 'rel="next"' not in second
    assert 'rel="prev" href="/"' in second
    for body in (first, second):
        assert "stealth number" not in body

    await fetch(client, "/?page=1")
    await fetch(client, "/?page=3", 404)
    await fetch(client, f"/m/{carol.public_id}?page=2")
    await fetch(client, f"/m/{carol.public_id}?page=3", 404)


@pytest.mark.parametrize(
    "page", ["0", "-1", "abc", "1.5", "1e3", "", "99999999999999999999", "10001", "%00", "+2"]
)
async def test_bad_page_values(client: TestClient[Any, Any], seeded: Seed, page: str) -> None:
    for base in ("/", f"/m/{seeded.alice}"):
        response = await client.get(f"{base}?page={page}")
        assert response.status == 400, (base, page)
        assert "text/html" in response.headers["Content-Type"]


# --- member pages ---------------------------------------------------------------------------


async def test_member_page(client: TestClient[Any, Any], seeded: Seed) -> None:
    body = await fetch(client, f"/m/{seeded.alice}")
    assert "Alice" in body
    assert job_links(body) == [seeded.orphan, seeded.grid]
    assert family_links(body) == [seeded.variation]
    assert_hidden(body, seeded, [seeded.stealth, seeded.running, seeded.failed, seeded.hostile])


async def test_stealth_only_member_page_shows_nothing_of_them(
    client: TestClient[Any, Any], seeded: Seed
) -> None:
    body = await fetch(client, f"/m/{seeded.bob}")
    assert job_links(body) == []
    assert "No public creations yet" in body
    assert_hidden(body, seeded, seeded.bob_jobs)
    assert "/t/" not in body and "/i/" not in body


@pytest.mark.parametrize(
    "path",
    [
        "/m/doesnotexist",
        "/m/" + "A" * 32,
        "/m/" + "A" * 33,
        "/m/%2e%2e%2fetc",
        "/m/abc%00def",
        "/m/%C3%A9t%C3%A9",
        "/m/' OR 1=1 --",
        "/m/",
    ],
)
async def test_unknown_or_malformed_member(client: TestClient[Any, Any], seeded: Seed, path: str) -> None:
    await fetch(client, path, 404)


# --- job pages ------------------------------------------------------------------------------


async def test_job_page(client: TestClient[Any, Any], seeded: Seed) -> None:
    body = await fetch(client, f"/j/{seeded.grid}")
    assert "a lighthouse at dusk, oil painting" in body
    # The parameters as the member typed them, defaults (--ar 1:1, --chaos 0) left out.
    params = re.findall(r'<span class="param">([^<]*)</span>', body)
    assert params == ["--no blurry", "--stylize 250", "--seed 1001"]
    # Internals are not shown.
    for internal in ("sdxl", "Kind", "Engine", "Width", "Chaos"):
        assert internal not in body, internal
    assert f'href="/m/{seeded.alice}"' in body
    for index in range(5):
        assert f'href="/i/{seeded.grid}/{index}.png"' in body
        assert f'download="mirage-{seeded.grid}-{index}.png"' in body
    for index in range(1, 5):
        assert f'src="/t/{seeded.grid}/{index}.webp"' in body
    assert 'property="og:image" content="https://gallery.example/i/' in body
    assert "data-parent" not in body


async def test_variation_links_public_parent(client: TestClient[Any, Any], seeded: Seed) -> None:
    body = await fetch(client, f"/j/{seeded.variation}")
    assert f'href="/j/{seeded.grid}" data-parent="{seeded.grid}"' in body
    assert "Made from (image 2)" in body


async def test_variation_of_stealth_parent_reveals_nothing(
    client: TestClient[Any, Any], seeded: Seed
) -> None:
    body = await fetch(client, f"/j/{seeded.orphan}")
    assert "public child of a hidden parent" in body
    assert_hidden(body, seeded, [seeded.stealth])
    assert "data-parent" not in body
    assert "Made from" not in body
    assert "image 2" not in body


async def test_hidden_jobs_are_exactly_like_missing_ones(client: TestClient[Any, Any], seeded: Seed) -> None:
    missing = await client.get("/j/" + "Z" * 22)
    missing_body = await missing.text()
    assert missing.status == 404
    for job_id in (seeded.stealth, *seeded.bob_jobs, seeded.running, seeded.failed):
        response = await client.get(f"/j/{job_id}")
        assert response.status == 404
        assert await response.text() == missing_body
        assert response.headers["Content-Type"] == missing.headers["Content-Type"]
        for path in (f"/i/{job_id}/0.png", f"/i/{job_id}/1.png", f"/t/{job_id}/0.webp"):
            response = await client.get(path)
            assert response.status == 404, path
            assert await response.text() == missing_body


@pytest.mark.parametrize(
    "path",
    [
        "/j/",
        "/j/nope",
        "/j/" + "a" * 33,
        "/j/..%2f..%2fetc%2fpasswd",
        "/j/%00",
        "/j/%E2%98%83",
        "/j/abc.def",
        "/j/' OR '1'='1",
        "/j/abc/extra",
        "/i/nope/0.png",
        "/t/nope/0.webp",
        "/no/such/route",
    ],
)
async def test_malformed_job_urls(client: TestClient[Any, Any], seeded: Seed, path: str) -> None:
    await fetch(client, path, 404)


# --- images ---------------------------------------------------------------------------------


async def test_full_image_download(client: TestClient[Any, Any], seeded: Seed) -> None:
    response = await client.get(f"/i/{seeded.grid}/0.png")
    assert response.status == 200
    assert response.headers["Content-Type"] == "image/png"
    assert f'filename="mirage-{seeded.grid}-0.png"' in response.headers["Content-Disposition"]
    data = await response.read()
    assert SECRET_TEXT.encode() not in data and b"tEXt" not in data
    with PILImage.open(io.BytesIO(data)) as img:
        assert img.size == (128, 128)
        assert not getattr(img, "text", {})

    response = await client.get(f"/i/{seeded.grid}/3.png")
    assert response.status == 200
    with PILImage.open(io.BytesIO(await response.read())) as img:
        assert img.size == (64, 64)

    head = await client.head(f"/i/{seeded.grid}/0.png")
    assert head.status == 200


async def test_thumbnail(client: TestClient[Any, Any], seeded: Seed, store: LocalMediaStore) -> None:
    response = await client.get(f"/t/{seeded.grid}/0.webp")
    assert response.status == 200
    assert response.headers["Content-Type"] == "image/webp"
    data = await response.read()
    assert SECRET_TEXT.encode() not in data
    with PILImage.open(io.BytesIO(data)) as img:
        assert img.format == "WEBP"
        assert max(img.size) <= 384
    assert await store.exists(f"thumbs/384/jobs/{seeded.grid}/0.webp")


@pytest.mark.parametrize(
    "name", ["9.png", "0.gif", "abc.png", "0", "0.png.png", "-1.png", "00000.png", "0.PNG", "%2e%2e.png"]
)
async def test_bad_image_names(client: TestClient[Any, Any], seeded: Seed, name: str) -> None:
    await fetch(client, f"/i/{seeded.grid}/{name}", 404)
    await fetch(client, f"/t/{seeded.grid}/{name}", 404)


async def test_missing_bytes_are_404(
    client: TestClient[Any, Any], seeded: Seed, store: LocalMediaStore
) -> None:
    await store.delete(f"jobs/{seeded.grid}/2.png")
    await fetch(client, f"/i/{seeded.grid}/2.png", 404)
    await fetch(client, f"/t/{seeded.grid}/2.webp", 404)


# --- hostile input --------------------------------------------------------------------------


async def test_hostile_prompt_and_name_are_escaped(client: TestClient[Any, Any], seeded: Seed) -> None:
    for path in ("/", f"/j/{seeded.hostile}", f"/m/{seeded.mallory}"):
        body = await fetch(client, path)
        assert "<script" not in body
        assert "<img src=x" not in body
        assert "<b onmouseover" not in body
        assert "&lt;b onmouseover=alert(2)&gt;Mallory&lt;/b&gt;" in body
        if path != f"/m/{seeded.mallory}":
            assert "&lt;script&gt;alert(&#34;pwned&#34;)&lt;/script&gt;" in body
    job_body = await fetch(client, f"/j/{seeded.hostile}")
    # Inside attributes (alt, og:title) quotes are escaped too, so nothing breaks out.
    assert 'alt="&lt;script&gt;alert(&#34;pwned&#34;)' in job_body


async def test_methods_other_than_get_are_not_500(client: TestClient[Any, Any], seeded: Seed) -> None:
    for path in ("/", f"/j/{seeded.grid}"):
        response = await client.post(path, data=b"x")
        assert response.status == 405
        response = await client.delete(path)
        assert response.status == 405
