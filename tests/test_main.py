"""``python -m bot``'s ``run()``: migrate, serve Discord and the gallery, stop cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import discord
import pytest
import sqlalchemy as sa

import bot.__main__ as bot_main
from bot.__main__ import ClientStopped, run
from bot.settings import BotSettings
from tests.botutil import FAKE_TOKEN, make_settings
from tests.conftest import main_exit_code
from tests.fakes import FakeDiscord

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bot_settings(tmp_path: Path, redis_url: str, **values: Any) -> BotSettings:
    """Embedded SQLite under ``tmp_path/data``, Redis as broker and backend, a free gallery port."""
    values.setdefault("web_port", free_port())
    return make_settings(
        tmp_path / "data",
        f"sqlite+aiosqlite:///{tmp_path / 'data' / 'mirage.db'}",
        broker_url=redis_url,
        result_backend=redis_url,
        **values,
    )


async def test_run_serves_and_stops_on_sigterm(tmp_path: Path, redis_url: str) -> None:
    db_file = tmp_path / "data" / "mirage.db"
    port = free_port()
    settings = bot_settings(tmp_path, redis_url, web_port=port)
    async with FakeDiscord(token=FAKE_TOKEN) as fake:
        for _attempt in range(2):
            task = asyncio.create_task(run(settings))
            await fake.wait_until_connected(timeout=20)
            async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                assert resp.status == 200
            os.kill(os.getpid(), signal.SIGTERM)  # the handler run() installed sets its stop event
            await asyncio.wait_for(task, 20)
            puts = [r for r in fake.requests if r.method == "PUT" and r.path.endswith("/commands")]
            assert len(puts) == 1  # synced on the first start only: the hash file remembers
        # The gallery port is closed again.
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            pass
    engine = sa.create_engine(f"sqlite:///{db_file}")
    with engine.connect() as conn:
        assert "jobs" in sa.inspect(conn).get_table_names()  # migrated at start
    engine.dispose()
    assert (tmp_path / "data" / "command_hash.json").exists()


async def test_a_token_discord_refuses_ends_run_with_a_non_zero_exit(tmp_path: Path, redis_url: str) -> None:
    settings = bot_settings(tmp_path, redis_url, discord_token="a-token-that-was-reset")
    async with FakeDiscord(token=FAKE_TOKEN) as fake:
        with pytest.raises(ClientStopped, match="refused the token"):
            await asyncio.wait_for(run(settings), 30)
        assert any(r.status == 401 for r in fake.requests)  # the fake Discord answered 401


async def test_an_unreachable_discord_ends_run_with_a_non_zero_exit(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed = free_port()  # nothing listens there once the probe socket is closed
    monkeypatch.setattr(discord.http.Route, "BASE", f"http://127.0.0.1:{closed}/api/v10")
    settings = bot_settings(tmp_path, redis_url)
    with pytest.raises(ClientStopped, match="could not be reached"):
        await asyncio.wait_for(run(settings), 30)


def test_main_exits_non_zero_when_the_client_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    async def refused(settings: BotSettings) -> None:
        raise ClientStopped("Discord refused the token (DISCORD_TOKEN is wrong or was reset)")

    monkeypatch.setattr(bot_main, "run", refused)
    monkeypatch.setattr(bot_main, "setup_logging", lambda settings: None)
    monkeypatch.setenv("DISCORD_TOKEN", "a-token-that-was-reset")
    code = main_exit_code()
    # A message as the code: Python prints it and exits with status 1 (Restart=on-failure restarts it).
    assert isinstance(code, str) and "refused the token" in code


async def test_start_logs_no_voice_warnings(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # discord.py warns once per process; re-arm it so this test sees the first start's warnings.
    monkeypatch.setattr(discord.VoiceClient, "warn_nacl", True)
    monkeypatch.setattr(discord.VoiceClient, "warn_dave", True)
    settings = bot_settings(tmp_path, redis_url)
    stop = asyncio.Event()
    with caplog.at_level(logging.WARNING):
        async with FakeDiscord(token=FAKE_TOKEN) as fake:
            task = asyncio.create_task(run(settings, stop=stop))
            await fake.wait_until_connected(timeout=20)
            stop.set()
            await asyncio.wait_for(task, 20)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [w for w in warnings if "voice" in w or "PyNaCl" in w or "davey" in w]


# A bot process that starts its local worker (a sleeper standing in for Celery) and then waits.
_BOT_WITH_WORKER = """
import subprocess, sys
import bot.__main__ as bot_main

real_popen = subprocess.Popen
def sleeper(command, **kwargs):
    return real_popen([sys.executable, "-c", "import time; time.sleep(600)"], **kwargs)
subprocess.Popen = sleeper
worker = bot_main._start_local_worker()
print(worker.pid, flush=True)
sys.stdin.read()
"""


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs Linux (pidfd, the parent-death signal)")
def test_the_local_worker_does_not_outlive_a_killed_bot() -> None:
    """``--with-worker``: a bot killed outright (OOM killer, SIGKILL) takes its worker with it.

    ``main``'s ``finally`` never runs then, and the worker has its own session, so without the
    kernel's help it would keep the GPU busy beside the next bot's worker.
    """
    bot_process = subprocess.Popen(
        [sys.executable, "-c", _BOT_WITH_WORKER],
        cwd=Path(__file__).resolve().parents[1],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert bot_process.stdout is not None
    try:
        worker = os.pidfd_open(int(bot_process.stdout.readline()))
    finally:
        bot_process.kill()
        bot_process.wait()
    try:
        # A pidfd turns readable when its process has exited.
        exited, _, _ = select.select([worker], [], [], 30)
        if not exited:
            signal.pidfd_send_signal(worker, signal.SIGKILL)
        assert exited, "the worker outlived the bot"
    finally:
        os.close(worker)
