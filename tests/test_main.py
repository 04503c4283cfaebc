"""``python -m bot``'s ``run()``: migrate, serve Discord and the gallery, stop cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path

import aiohttp
import pytest
import sqlalchemy as sa

from bot.__main__ import run
from tests.botutil import FAKE_TOKEN, make_settings
from tests.fakes import FakeDiscord

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_run_serves_and_stops_on_sigterm(tmp_path: Path, redis_url: str) -> None:
    db_file = tmp_path / "data" / "mirage.db"
    port = free_port()
    settings = make_settings(
        tmp_path / "data",
        f"sqlite+aiosqlite:///{db_file}",
        broker_url=redis_url,
        result_backend=redis_url,
        web_port=port,
    )
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
