"""Prometheus metrics: counters, histograms, gauges, bounded labels, and the bot's /metrics route."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import prometheus_client
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

import bot.metrics as metrics
from bot.metrics import Metrics
from bot.settings import BotSettings
from bot.storage import LocalMediaStore
from bot.web import create_app
from workers.schema import Engine, ErrorCode, JobKind


@pytest.fixture
def db_url(sqlite_url: str) -> str:
    """SQLite only: the metrics route does not touch the database (overrides conftest's pair)."""
    return sqlite_url


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> Metrics:
    """Isolated metrics behind the module functions, so values are exact whatever ran before."""
    fresh = Metrics()
    monkeypatch.setattr(metrics, "_metrics", fresh)
    return fresh


@pytest.fixture
async def client(
    sessions: async_sessionmaker[AsyncSession], tmp_path: Path, fresh: Metrics
) -> AsyncIterator[TestClient]:
    """The bot's web app (the gallery) over a migrated SQLite database."""
    settings = BotSettings(_env_file=None, media_dir=tmp_path / "media")
    app = create_app(sessions, LocalMediaStore(settings.media_dir), settings)
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse an exposition into {(sample name, sorted labels): value}."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")


def lines(text: str) -> set[tuple[str, frozenset[tuple[str, str]], float]]:
    """The exposition's sample lines as (name, labels, value), whatever order labels come in."""
    found = set()
    for line in text.splitlines():
        match = _LINE.match(line)
        if match is None:
            continue
        labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        found.add((match.group(1), labels, float(match.group(3))))
    return found


def line(name: str, sample: float, **labels: str) -> tuple[str, frozenset[tuple[str, str]], float]:
    """One expected sample line."""
    return (name, frozenset(labels.items()), sample)


def value(m: Metrics, name: str, **labels: str) -> float | None:
    """One sample of ``m``'s registry."""
    return m.registry.get_sample_value(name, labels)


async def test_metrics_endpoint_serves_counters_after_a_job(client: TestClient, fresh: Metrics) -> None:
    """A job accepted and completed shows up on /metrics with its counts, credits and timings."""
    # What JobService and Delivery call for an SDXL /imagine that costs 1 credit, waited 3.2 s at
    # the broker and took 8.5 s to generate.
    metrics.record_accepted(JobKind.IMAGINE, Engine.SDXL, 1)
    metrics.record_completed(JobKind.IMAGINE, Engine.SDXL, queue_wait_s=3.2, generation_s=8.5)
    # And a DALL-E upscale that the content filter rejected, refunded.
    metrics.record_accepted("upscale", "openai", 2)
    metrics.record_failed("upscale", "openai", ErrorCode.CONTENT_POLICY)
    metrics.record_refunded("upscale", "openai", 2)
    metrics.set_workers_online(2)

    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert response.headers["Cache-Control"] == "no-store"
    text = await response.text()
    shown = lines(text)

    assert line("mirage_jobs_accepted_total", 1, kind="imagine", engine="sdxl") in shown
    assert line("mirage_jobs_completed_total", 1, kind="imagine", engine="sdxl") in shown
    assert line("mirage_credits_spent_total", 1, kind="imagine", engine="sdxl") in shown
    assert line("mirage_jobs_accepted_total", 1, kind="upscale", engine="openai") in shown
    assert line("mirage_credits_spent_total", 2, kind="upscale", engine="openai") in shown
    assert (
        line("mirage_jobs_failed_total", 1, kind="upscale", engine="openai", code="content_policy") in shown
    )
    assert line("mirage_jobs_refunded_total", 1, kind="upscale", engine="openai") in shown
    assert line("mirage_credits_refunded_total", 2, kind="upscale", engine="openai") in shown
    assert line("mirage_workers_online", 2) in shown

    parsed = samples(text)
    wait = (("engine", "sdxl"),)
    assert parsed[("mirage_job_queue_wait_seconds_count", wait)] == 1
    assert parsed[("mirage_job_queue_wait_seconds_sum", wait)] == pytest.approx(3.2)
    assert parsed[("mirage_job_generation_seconds_count", wait)] == 1
    assert parsed[("mirage_job_generation_seconds_sum", wait)] == pytest.approx(8.5)
    assert parsed[("mirage_job_generation_seconds_bucket", (("engine", "sdxl"), ("le", "7.5")))] == 0
    assert parsed[("mirage_job_generation_seconds_bucket", (("engine", "sdxl"), ("le", "10.0")))] == 1
    # Nothing else moved: the DALL-E job never completed, the SDXL one never failed.
    assert parsed[("mirage_jobs_completed_total", (("engine", "openai"), ("kind", "upscale")))] == 0
    assert parsed[("mirage_job_generation_seconds_count", (("engine", "openai"),))] == 0
    failed_sdxl = [
        v
        for (name, labels), v in parsed.items()
        if name == "mirage_jobs_failed_total" and ("engine", "sdxl") in labels
    ]
    assert failed_sdxl and not any(failed_sdxl)


async def test_metrics_endpoint_speaks_openmetrics_when_asked(client: TestClient, fresh: Metrics) -> None:
    """Prometheus asks for OpenMetrics; the route negotiates it."""
    metrics.record_accepted(JobKind.IMAGINE, Engine.SDXL, 1)
    response = await client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    text = await response.text()
    assert text.rstrip().endswith("# EOF")
    assert line("mirage_jobs_accepted_total", 1, kind="imagine", engine="sdxl") in lines(text)


async def test_gallery_routes_still_served(client: TestClient) -> None:
    """Mounting /metrics leaves the gallery's own routes alone."""
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/")).status == 200


def test_every_known_series_starts_at_zero(fresh: Metrics) -> None:
    """increase() sees a first failure after a restart only if the series already exists at 0."""
    for kind in JobKind:
        for engine in Engine:
            assert value(fresh, "mirage_jobs_accepted_total", kind=kind.value, engine=engine.value) == 0
            for code in ErrorCode:
                labels = {"kind": kind.value, "engine": engine.value, "code": code.value}
                assert value(fresh, "mirage_jobs_failed_total", **labels) == 0


def test_labels_are_bounded(fresh: Metrics) -> None:
    """Unknown kinds, engines and codes count as ``other``: no label value from outside the enums."""
    metrics.record_accepted("hack\nme", "sdxl", 1)
    metrics.record_failed("imagine", "midjourney", "weird-code-" + "x" * 200)
    metrics.record_completed("IMAGINE", Engine.SDXL, None, None)
    assert value(fresh, "mirage_jobs_accepted_total", kind="other", engine="sdxl") == 1
    assert value(fresh, "mirage_jobs_failed_total", kind="imagine", engine="other", code="other") == 1
    assert value(fresh, "mirage_jobs_completed_total", kind="imagine", engine="sdxl") == 1  # case folded
    allowed = (
        {k.value for k in JobKind} | {e.value for e in Engine} | {c.value for c in ErrorCode} | {"other"}
    )
    for family in fresh.registry.collect():
        for sample in family.samples:
            for name, label in sample.labels.items():
                if name in ("kind", "engine", "code"):
                    assert label in allowed, (sample.name, label)


def test_unknown_or_implausible_timings_are_not_observed(fresh: Metrics) -> None:
    """A crop has no generation; clock skew can make a wait negative: neither corrupts the sums."""
    metrics.record_completed(JobKind.CROP, Engine.SDXL, queue_wait_s=None, generation_s=None)
    metrics.record_completed(JobKind.IMAGINE, Engine.SDXL, queue_wait_s=-0.3, generation_s=float("nan"))
    metrics.record_completed(JobKind.IMAGINE, Engine.SDXL, queue_wait_s=0.0, generation_s=True)  # type: ignore[arg-type]
    assert value(fresh, "mirage_jobs_completed_total", kind="crop", engine="sdxl") == 1
    assert value(fresh, "mirage_jobs_completed_total", kind="imagine", engine="sdxl") == 2
    assert value(fresh, "mirage_job_queue_wait_seconds_count", engine="sdxl") == 1  # only the 0.0
    assert value(fresh, "mirage_job_generation_seconds_count", engine="sdxl") == 0


def test_zero_cost_jobs_spend_no_credits(fresh: Metrics) -> None:
    """U# crops cost nothing: counted as accepted, no credits, no refund amount."""
    metrics.record_accepted(JobKind.CROP, Engine.SDXL, 0)
    metrics.record_refunded(JobKind.CROP, Engine.SDXL, 0)
    assert value(fresh, "mirage_jobs_accepted_total", kind="crop", engine="sdxl") == 1
    assert value(fresh, "mirage_credits_spent_total", kind="crop", engine="sdxl") == 0
    assert value(fresh, "mirage_jobs_refunded_total", kind="crop", engine="sdxl") == 1
    assert value(fresh, "mirage_credits_refunded_total", kind="crop", engine="sdxl") == 0


def test_dedicated_registry() -> None:
    """Nothing of Mirage's lands in prometheus_client's global registry, and two Metrics coexist."""
    a, b = Metrics(), Metrics()
    a.record_accepted("imagine", "sdxl", 3)
    assert value(b, "mirage_jobs_accepted_total", kind="imagine", engine="sdxl") == 0
    global_names = {family.name for family in prometheus_client.REGISTRY.collect()}
    assert not any(name.startswith("mirage_") for name in global_names)
    body, content_type = a.render()
    assert content_type.startswith("text/plain") and b"mirage_credits_spent_total" in body


def test_render_returns_bytes_and_content_type(fresh: Metrics) -> None:
    """The module-level render() is what /metrics serves."""
    metrics.record_accepted(JobKind.REROLL, Engine.OPENAI, 2)
    body, content_type = metrics.render()
    assert isinstance(body, bytes) and content_type.startswith("text/plain; version=0.0.4")
    assert line("mirage_credits_spent_total", 2, kind="reroll", engine="openai") in lines(body.decode())


@dataclass
class FakeStatus:
    """What ``Dispatcher.worker_status`` returns."""

    workers: list[str] = field(default_factory=list)
    queue_depths: dict[str, int | None] = field(default_factory=dict)


class FakeDispatcher:
    """Answers worker pings from a script."""

    def __init__(self, *statuses: FakeStatus | Exception) -> None:
        self.statuses = list(statuses)
        self.timeouts: list[float] = []

    async def worker_status(self, ping_timeout: float = 1.0) -> FakeStatus:
        self.timeouts.append(ping_timeout)
        status = self.statuses.pop(0)
        if isinstance(status, Exception):
            raise status
        return status


async def test_poll_sets_workers_online_and_queue_depth(fresh: Metrics) -> None:
    """The poller keeps the gauges fresh; an unknown depth (None) leaves the last value."""
    source = FakeDispatcher(
        FakeStatus(["mirage-gpu@a", "mirage-api@b"], {"gpu": 4, "api": 0}),
        FakeStatus(["mirage-gpu@a"], {"gpu": None, "api": 1}),
    )
    assert await metrics.poll_workers_once(source, ping_timeout=0.5) == 2
    assert value(fresh, "mirage_workers_online") == 2
    assert value(fresh, "mirage_queue_depth", queue="gpu") == 4
    assert (value(fresh, "mirage_workers_online_updated_timestamp_seconds") or 0) > 0
    await metrics.poll_workers_once(source)
    assert value(fresh, "mirage_workers_online") == 1
    assert value(fresh, "mirage_queue_depth", queue="gpu") == 4
    assert value(fresh, "mirage_queue_depth", queue="api") == 1
    assert source.timeouts == [0.5, 2.0]


async def test_poll_loop_survives_a_broker_outage(fresh: Metrics, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed poll is logged and retried; only cancellation ends the loop."""
    import asyncio

    source = FakeDispatcher(ConnectionError("broker down"), FakeStatus(["w@1"], {}))
    sleeps: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 2:
            raise asyncio.CancelledError

    monkeypatch.setattr(metrics.asyncio, "sleep", fake_sleep)
    with pytest.raises(asyncio.CancelledError):
        await metrics.poll_workers(source, interval_s=30.0)
    assert sleeps == [30.0, 30.0]
    assert value(fresh, "mirage_workers_online") == 1


async def gallery(
    sessions: async_sessionmaker[AsyncSession], tmp_path: Path, **overrides: object
) -> TestClient:
    settings = BotSettings(_env_file=None, media_dir=tmp_path / "media", **overrides)  # type: ignore[arg-type]
    return TestClient(TestServer(create_app(sessions, LocalMediaStore(settings.media_dir), settings)))


async def test_metrics_behind_a_bearer_token(
    sessions: async_sessionmaker[AsyncSession], tmp_path: Path, fresh: Metrics
) -> None:
    async with await gallery(sessions, tmp_path, metrics_token="s3cret-scrape") as client:
        assert (await client.get("/metrics")).status == 401
        wrong = await client.get("/metrics", headers={"Authorization": "Bearer nope"})
        assert wrong.status == 401
        right = await client.get("/metrics", headers={"Authorization": "Bearer s3cret-scrape"})
        assert right.status == 200
        assert "mirage_jobs_accepted_total" in await right.text()


async def test_metrics_on_their_own_port_leave_the_gallery_without_them(
    sessions: async_sessionmaker[AsyncSession], tmp_path: Path, fresh: Metrics
) -> None:
    import socket

    import aiohttp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = BotSettings(_env_file=None, web_host="127.0.0.1", metrics_port=port)  # type: ignore[call-arg]
    async with await gallery(sessions, tmp_path, metrics_port=port) as client:
        assert (await client.get("/metrics")).status == 404
    runner = await metrics.start_metrics(settings)
    assert runner is not None
    try:
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as response:
            assert response.status == 200
            assert "mirage_jobs_accepted_total" in await response.text()
    finally:
        await runner.cleanup()


def test_process_metrics_are_served_beside_the_jobs(fresh: Metrics) -> None:
    """An operator sees the bot process's CPU, memory and Python version next to the job series."""
    body, _ = fresh.render()
    text = body.decode()
    assert "process_resident_memory_bytes" in text and "process_cpu_seconds_total" in text
    assert "python_info" in text
