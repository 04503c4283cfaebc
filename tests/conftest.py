"""Shared fixtures: real PostgreSQL, Redis and RabbitMQ where production uses them, SQLite for embedded.

PostgreSQL, Redis and RabbitMQ tests skip when the server is unreachable, unless MIRAGE_REQUIRE_SERVICES=1
(CI sets it), where an unreachable server fails the run instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

import bot.__main__ as bot_main
from bot.database import make_engine, make_sessionmaker, upgrade
from bot.logconfig import QUIET_LOGGERS
from bot.settings import get_settings

POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RABBITMQ_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")
REQUIRE_SERVICES = os.environ.get("MIRAGE_REQUIRE_SERVICES") == "1"


def _reachable(url: str, default_port: int) -> bool:
    parsed = urlparse(url.replace("+psycopg", "").replace("amqp://", "http://"))
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or default_port), 2):
            return True
    except OSError:
        return False


def _need(url: str, port: int, what: str) -> None:
    if _reachable(url, port):
        return
    if REQUIRE_SERVICES:
        pytest.fail(f"{what} is required (MIRAGE_REQUIRE_SERVICES=1) but {url} is unreachable")
    pytest.skip(f"{what} not reachable at {url}")


def fresh_redis_db(db: int) -> str:
    """The URL of database ``db`` on the shared Redis, emptied (each test module owns one number)."""
    _need(REDIS_URL, 6379, "Redis")
    import redis

    url = urlunparse(urlparse(REDIS_URL)._replace(path=f"/{db}"))
    redis.Redis.from_url(url).flushdb()
    return url


def main_exit_code(argv: list[str] | None = None) -> object:
    """Run ``python -m bot``'s ``main`` on fresh settings, which must exit; its ``SystemExit`` code."""
    get_settings.cache_clear()
    try:
        with pytest.raises(SystemExit) as stopped:
            bot_main.main(argv or [])
    finally:
        get_settings.cache_clear()
    return stopped.value.code


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    _need(POSTGRES_URL, 5432, "PostgreSQL")
    import psycopg

    admin = POSTGRES_URL.replace("postgresql+psycopg://", "postgresql://")
    name = f"mirage_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_URL.rsplit("/", 1)[0]
    if not base.startswith("postgresql+psycopg://"):
        base = base.replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh SQLite database file for one test."""
    return f"sqlite+aiosqlite:///{tmp_path / 'mirage.db'}"


@pytest.fixture
async def h(tmp_path: Path, sqlite_url: str) -> AsyncIterator[Any]:
    """A bot over SQLite with a fake dispatcher (tests.botutil.Harness)."""
    from tests.botutil import FakeDispatcher, bot_harness  # the bot stack only where a test needs it

    async with bot_harness(tmp_path, sqlite_url, FakeDispatcher()) as harness:
        yield harness


@pytest.fixture
def redis_url() -> str:
    """The Redis server's URL (tests use unique keys and queue names on it)."""
    _need(REDIS_URL, 6379, "Redis")
    return REDIS_URL


@pytest.fixture
def rabbitmq_url() -> str:
    """The RabbitMQ broker's URL, Celery's recommended production broker (tests use unique queues)."""
    _need(RABBITMQ_URL, 5672, "RabbitMQ")
    return RABBITMQ_URL


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Both backends: the embedded SQLite default and PostgreSQL."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("pg_url")


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    """A migrated database on each backend."""
    # Alembic's env runs its own event loop, so it cannot run inside this one.
    await asyncio.to_thread(upgrade, db_url)
    eng = make_engine(db_url)
    try:
        yield eng
    finally:
        await eng.dispose()


@pytest.fixture
def sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Session factory over the migrated database."""
    return make_sessionmaker(engine)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight SDXL saved with ``save_pretrained`` (64 px native), built once per session."""
    from workers.sdxl.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="module")
def worker(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One warmed-up real Celery worker (tiny model) per test module, on a private queue of Redis."""
    from tests.botutil import run_worker, warm_worker

    _need(REDIS_URL, 6379, "Redis")
    with run_worker(tiny_model_dir, REDIS_URL, tmp_path_factory.mktemp("worker")) as proc:
        asyncio.run(warm_worker(proc, REDIS_URL))
        yield proc


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    """Put the root logger (and the loggers ``setup_logging`` tunes) back as they were."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in ("discord.http", *QUIET_LOGGERS)}
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, value in levels.items():
            logging.getLogger(name).setLevel(value)
