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
from pydantic import ValidationError
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.favourites import favourite_count, is_favourite, toggle_favourite
from bot.media import save_job_images
from bot.models import Favourite, Job, JobStatus, Member
from bot.settings import BotSettings
from bot.storage import LocalMediaStore, S3MediaStore
from bot.web import PAGE_SIZE, create_app
from tests.fakes.s3_server import FakeS3Server

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


# --- families, aspect ratios, parameter line ------------------------------------------------


async def test_cards_keep_each_image_aspect_ratio(
    client: TestClient[Any, Any], sessions: async_sessionmaker[AsyncSession], store: LocalMediaStore
) -> None:
    async with sessions() as session:
        s = Seeder(session, store)
        carol = await s.member(5, "Carol")
        wide = await s.job(carol, "a wide valley", tiles=0)
        await save_job_images(store, session, wide, [(0, png((300, 200)))])
        wide.params = {"aspect": [3, 2], "stylize": 100, "chaos": 20}
        tall = await s.job(carol, "a tall tower", tiles=0)
        await save_job_images(store, session, tall, [(0, png((120, 240)))])
        await session.commit()
    body = await fetch(client, "/")
    lazy = 'loading="lazy" decoding="async"'
    assert f'src="/t/{wide.id}/0.webp" alt="a wide valley" {lazy} width="300" height="200"' in body
    assert f'src="/t/{tall.id}/0.webp" alt="a tall tower" {lazy} width="120" height="240"' in body
    # The caption is the line the member typed: prompt and parameters, no internals.
    captions = re.findall(r'<span class="p">([^<]*)</span>', body)
    assert f"a wide valley --ar 3:2 --chaos 20 --seed {wide.seed}" in captions
    # Thumbnails keep the ratio too (the masonry shows them uncropped).
    response = await client.get(f"/t/{wide.id}/0.webp")
    with PILImage.open(io.BytesIO(await response.read())) as img:
        assert img.size == (300, 200)


async def test_families_follow_parents_and_stop_at_hidden_ones(
    client: TestClient[Any, Any], sessions: async_sessionmaker[AsyncSession], store: LocalMediaStore
) -> None:
    async with sessions() as session:
        s = Seeder(session, store)
        dana = await s.member(6, "Dana")
        grid = await s.job(dana, "a koi pond")
        upscale = await s.job(dana, "a koi pond", kind="crop", parent=grid, tiles=0)
        variation = await s.job(dana, "a koi pond", kind="variation", parent=upscale)
        hidden = await s.job(
            dana, "a koi pond, secret take", kind="variation", parent=grid, visibility="stealth"
        )
        below_hidden = await s.job(dana, "a koi pond again", kind="crop", parent=hidden, tiles=0)
        await session.commit()
    body = await fetch(client, "/")
    assert job_links(body) == [below_hidden.id, grid.id]
    assert family_links(body) == [upscale.id, variation.id]
    assert hidden.id not in body and "secret take" not in body
    # Each family member's page shows the whole shown family, root first, itself marked.
    page = await fetch(client, f"/j/{variation.id}")
    assert family_links(page) == [grid.id, upscale.id, variation.id]
    assert f'class="kid here" href="/j/{variation.id}"' in page
    assert hidden.id not in page
    lone = await fetch(client, f"/j/{below_hidden.id}")
    assert family_links(lone) == [] and hidden.id not in lone


# --- search ---------------------------------------------------------------------------------


async def test_search_finds_families_by_prompt(client: TestClient[Any, Any], seeded: Seed) -> None:
    body = await fetch(client, "/?q=lighthouse")
    assert job_links(body) == [seeded.grid]
    assert family_links(body) == [seeded.variation]
    assert 'value="lighthouse"' in body
    # Word forms match (stemming), phrases and exclusions work as in a web search.
    assert job_links(await fetch(client, "/?q=lighthouses")) == [seeded.grid]
    assert job_links(await fetch(client, '/?q="oil painting"')) == [seeded.grid]
    assert job_links(await fetch(client, "/?q=lighthouse+-painting")) == []
    # A public child of a hidden grid is found on its own, its parent never.
    assert job_links(await fetch(client, "/?q=hidden+parent")) == [seeded.orphan]


async def test_search_never_finds_hidden_jobs(client: TestClient[Any, Any], seeded: Seed) -> None:
    for query in ("falcon", "secret project", "bob hidden", "still running", "failed"):
        body = await fetch(client, f"/?q={query.replace(' ', '+')}")
        assert job_links(body) == [], query
        assert "Nothing matches" in body
        assert_hidden(body, seeded, [seeded.stealth, *seeded.bob_jobs, seeded.running, seeded.failed])


@pytest.mark.parametrize(
    "query", ['"', "'; DROP TABLE jobs; --", "NEAR(a b)", "a* OR b", "%", "_", "-", "!!!", "x" * 500, "é"]
)
async def test_odd_search_input_is_just_text(client: TestClient[Any, Any], seeded: Seed, query: str) -> None:
    response = await client.get("/", params={"q": query})
    body = await response.text()
    assert response.status == 200, body[:300]
    assert job_links(body) == []


async def test_a_nul_in_a_search_separates_words(client: TestClient[Any, Any], seeded: Seed) -> None:
    # PostgreSQL text cannot hold a NUL: passed on to the database, the search answered a 500.
    body = await fetch(client, "/?q=lighthouse%00dusk")
    assert job_links(body) == [seeded.grid]
    assert "\x00" not in body and 'value="lighthouse dusk"' in body


async def test_search_pages_keep_the_query(
    client: TestClient[Any, Any], sessions: async_sessionmaker[AsyncSession], store: LocalMediaStore
) -> None:
    async with sessions() as session:
        s = Seeder(session, store)
        erin = await s.member(7, "Erin")
        for i in range(PAGE_SIZE + 2):
            await s.job(erin, f"owl portrait number {i}", tiles=0)
        await s.job(erin, "a cat", tiles=0)
        await session.commit()
    first = await fetch(client, "/?q=owl")
    assert len(job_links(first)) == PAGE_SIZE
    assert 'rel="next" href="/?q=owl&amp;page=2"' in first
    second = await fetch(client, "/?q=owl&page=2")
    assert len(job_links(second)) == 2
    assert 'rel="prev" href="/?q=owl"' in second


async def test_sqlite_search_falls_back_to_like_without_fts5(
    db_url: str,
    sessions: async_sessionmaker[AsyncSession],
    store: LocalMediaStore,
    client: TestClient[Any, Any],
    seeded: Seed,
) -> None:
    if not db_url.startswith("sqlite"):
        pytest.skip("PostgreSQL always has its text search; the fallback is for SQLite builds")
    # A table rebuild drops the triggers: the index would stop following new jobs, so it is
    # not used, and a job added afterwards is still found.
    async with sessions() as session:
        for trigger in ("jobs_fts_insert", "jobs_fts_delete", "jobs_fts_update"):
            await session.execute(text(f"DROP TRIGGER {trigger}"))
        await session.commit()
    async with sessions() as session:
        seeder = Seeder(session, store)
        seeder.tick = 100  # after everything seeded before
        late = await seeder.job(await session.get_one(Member, 1), "a late lighthouse", tiles=0)
        await session.commit()
    assert job_links(await fetch(client, "/?q=lighthouse")) == [late.id, seeded.grid]
    # A SQLite without FTS5 has no table at all.
    async with sessions() as session:
        await session.execute(text("DROP TABLE jobs_fts"))
        await session.commit()
    assert job_links(await fetch(client, "/?q=LIGHTHOUSE")) == [late.id, seeded.grid]
    assert job_links(await fetch(client, "/?q=lighthouse+-painting")) == [late.id]
    assert job_links(await fetch(client, "/?q=falcon")) == []
    # LIKE wildcards in the query are literal characters.
    assert job_links(await fetch(client, "/?q=%25")) == []
    assert job_links(await fetch(client, "/?q=_")) == []


# --- favourites and the top view -------------------------------------------------------------


async def _member_row(sessions: async_sessionmaker[AsyncSession], user_id: int) -> int:
    async with sessions() as session:
        return int(await session.scalar(select(Member.id).where(Member.user_id == user_id)))  # type: ignore[arg-type]


async def test_toggle_favourite(sessions: async_sessionmaker[AsyncSession], seeded: Seed) -> None:
    alice = await _member_row(sessions, 1)
    async with sessions() as session:
        assert await toggle_favourite(session, alice, seeded.grid) is True
        assert await is_favourite(session, alice, seeded.grid)
        assert await favourite_count(session, seeded.grid) == 1
        assert await toggle_favourite(session, alice, seeded.grid) is False
        assert await favourite_count(session, seeded.grid) == 0
        assert await toggle_favourite(session, alice, seeded.grid) is True
        await session.commit()
    async with sessions() as session:
        assert await favourite_count(session, seeded.grid) == 1
        with pytest.raises(LookupError):
            await toggle_favourite(session, alice, "Z" * 22)
        # The table itself refuses a second row for the same member and job.
        session.add(Favourite(member_id=alice, job_id=seeded.grid))
        with pytest.raises(IntegrityError):
            await session.flush()


async def test_top_ranks_families_by_favourites(
    client: TestClient[Any, Any], sessions: async_sessionmaker[AsyncSession], seeded: Seed
) -> None:
    assert "Nothing has been favourited yet" in await fetch(client, "/top")
    alice, bob, mallory = [await _member_row(sessions, u) for u in (1, 2, 3)]
    async with sessions() as session:
        for member_id, job_id in [
            (alice, seeded.hostile),
            (bob, seeded.grid),
            (mallory, seeded.variation),  # counts for the grid's family
            *[(m, seeded.stealth) for m in (alice, bob, mallory)],  # never shown, never counted
        ]:
            await toggle_favourite(session, member_id, job_id)
        await session.commit()
    body = await fetch(client, "/top")
    assert job_links(body) == [seeded.grid, seeded.hostile]
    assert re.findall(r"❤️ (\d+)", body) == ["2", "1"]
    assert_hidden(body, seeded, [seeded.stealth])
    # The newest view shows the same counts.
    feed_body = await fetch(client, "/")
    assert re.findall(r'aria-label="(\d+) favourites"', feed_body) == ["1", "0", "2"]
    # A job's page counts its own favourites.
    assert 'aria-label="1 favourites"' in await fetch(client, f"/j/{seeded.variation}")


async def test_member_page_lists_their_shown_favourites(
    client: TestClient[Any, Any], sessions: async_sessionmaker[AsyncSession], seeded: Seed
) -> None:
    bob = await _member_row(sessions, 2)
    async with sessions() as session:
        for job_id in (seeded.grid, seeded.stealth, seeded.hostile, seeded.running):
            await toggle_favourite(session, bob, job_id)
        await session.commit()
    body = await fetch(client, f"/m/{seeded.bob}/favourites")
    assert job_links(body) == [seeded.hostile, seeded.grid]  # most recently favourited first
    assert_hidden(body, seeded, [seeded.stealth, seeded.running, *seeded.bob_jobs])
    assert f'href="/m/{seeded.bob}/favourites" aria-current="page"' in body
    assert "No favourites yet" in await fetch(client, f"/m/{seeded.alice}/favourites")
    await fetch(client, "/m/nobody/favourites", 404)


# --- branding, files, assets ----------------------------------------------------------------


async def test_owner_branding(
    sessions: async_sessionmaker[AsyncSession], store: LocalMediaStore, tmp_path: Path
) -> None:
    settings = BotSettings(
        _env_file=None,
        media_dir=tmp_path / "media",
        gallery_name="Fox <Den> & Co",
        gallery_accent="#ff0066",
        gallery_logo="/brand/fox.png",
    )
    async with TestClient(TestServer(create_app(sessions, store, settings))) as branded:
        body = await fetch(branded, "/")
        assert "<title>Explore · Fox &lt;Den&gt; &amp; Co</title>" in body
        assert '<img class="logo-img" src="/brand/fox.png"' in body
        theme = await branded.get("/theme.css")
        assert theme.headers["Content-Type"].startswith("text/css")
        assert "--accent:#ff0066" in await theme.text()
    for bad in ({"gallery_accent": "red;}body{x"}, {"gallery_logo": "https://evil.example/x.png"}):
        with pytest.raises(ValidationError):
            BotSettings(_env_file=None, **bad)


async def test_images_are_files_with_etag_and_ranges(client: TestClient[Any, Any], seeded: Seed) -> None:
    for path in (f"/i/{seeded.grid}/0.png", f"/t/{seeded.grid}/0.webp"):
        full = await client.get(path)
        data = await full.read()
        etag = full.headers["ETag"]
        assert full.status == 200 and full.headers["Accept-Ranges"] == "bytes"
        again = await client.get(path, headers={"If-None-Match": etag})
        assert again.status == 304
        part = await client.get(path, headers={"Range": "bytes=0-7"})
        assert part.status == 206
        assert await part.read() == data[:8]
        assert part.headers["Content-Range"] == f"bytes 0-7/{len(data)}"


async def test_s3_images_redirect_to_presigned_urls(
    sessions: async_sessionmaker[AsyncSession], tmp_path: Path
) -> None:
    pytest.importorskip("boto3")
    async with FakeS3Server(buckets=("pics",)) as server:
        s3 = S3MediaStore(
            "pics", endpoint_url=server.endpoint_url, region="us-east-1", access_key="a", secret_key="b",
            prefix="mirage",
        )  # fmt: skip
        seed = await seed_gallery(sessions, s3)  # type: ignore[arg-type]
        settings = BotSettings(_env_file=None, media_dir=tmp_path / "media")
        async with TestClient(TestServer(create_app(sessions, s3, settings))) as s3_client:
            before = len(server.requests)
            response = await s3_client.get(f"/i/{seed.grid}/0.png", allow_redirects=False)
            assert response.status == 302
            location = response.headers["Location"]
            assert location.startswith(f"{server.endpoint_url}/pics/mirage/jobs/{seed.grid}/0.png?")
            assert "Signature=" in location and len(server.requests) == before  # signed locally
            thumb = await s3_client.get(f"/t/{seed.grid}/1.webp", allow_redirects=False)
            assert thumb.status == 302 and "/mirage/thumbs/384/" in thumb.headers["Location"]
            assert "mirage/thumbs/384/jobs/" + seed.grid + "/1.webp" in server.objects("pics")
            # The pages may load images from the bucket's origin, and from nowhere else.
            page = await s3_client.get("/")
            assert f"img-src 'self' {server.endpoint_url};" in page.headers["Content-Security-Policy"]
            # Hidden jobs never get a URL.
            hidden = await s3_client.get(f"/i/{seed.stealth}/0.png", allow_redirects=False)
            assert hidden.status == 404 and "Location" not in hidden.headers
            # The bucket down: a thumbnail not made yet is "try again" (503), not an error page;
            # full images still redirect (signing needs no request).
            server.outage()
            down = await s3_client.get(f"/t/{seed.grid}/2.webp", allow_redirects=False)
            assert down.status == 503 and down.headers["Retry-After"] == "30"
            assert "try again" in await down.text()
            full = await s3_client.get(f"/i/{seed.grid}/2.png", allow_redirects=False)
            assert full.status == 302


async def test_static_assets_are_served_locally(client: TestClient[Any, Any]) -> None:
    for path, kind in (
        ("/static/gallery.css", "text/css"),
        ("/static/editor.css", "text/css"),
        ("/static/editor.js", "javascript"),
    ):
        response = await client.get(path)
        assert response.status == 200, path
        assert kind in response.headers["Content-Type"]
        assert "ETag" in response.headers
    await fetch(client, "/static/../app.py", 404)
    await fetch(client, "/static/nope.js", 404)
