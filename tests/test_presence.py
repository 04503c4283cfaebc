"""/status on the embedded broker: every local worker is listed, with its queues, while it lives.

The embedded transport cannot carry pings, so workers leave presence files (``workers.presence``)
that the bot's ``worker_status`` reads. A real ``python -m workers worker`` is started on an
embedded broker; the bot-side dispatcher must list it, and stop listing it once it is stopped or
SIGKILLed (a killed worker leaves its file behind; its dead process id gives it away).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from bot.dispatch import CeleryDispatcher
from tests.workerutil import WorkerProcess
from workers import presence
from workers.schema import QUEUE_API

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def embedded_urls(tmp_path: Path) -> tuple[str, str]:
    return (
        f"sqla+sqlite:///{tmp_path / 'data' / 'broker.db'}",
        f"db+sqlite:///{tmp_path / 'data' / 'results.db'}",
    )


async def listed(dispatcher: CeleryDispatcher) -> list[str]:
    return (await dispatcher.worker_status(ping_timeout=0.2)).workers


async def wait_listed(dispatcher: CeleryDispatcher, want: bool, name: str) -> list[str]:
    async with asyncio.timeout(60):
        while True:
            workers = await listed(dispatcher)
            if any(name in line for line in workers) is want:
                return workers
            await asyncio.sleep(0.1)


def start_api_worker(tmp_path: Path, broker: str, backend: str, name: str) -> WorkerProcess:
    env = {"BROKER_URL": broker, "RESULT_BACKEND": backend, "OPENAI_API_KEY": "", "WARMUP": "0"}
    worker = WorkerProcess(env, tmp_path / f"{name}.log", queues=QUEUE_API, pool="threads", concurrency=2)
    worker.args += ["--hostname", f"{name}@localhost"]
    return worker.start()


async def test_local_workers_are_listed_while_they_live(tmp_path: Path) -> None:
    broker, backend = embedded_urls(tmp_path)
    dispatcher = CeleryDispatcher.from_urls(broker, backend)
    first = start_api_worker(tmp_path, broker, backend, "api-one")
    second = start_api_worker(tmp_path, broker, backend, "api-two")
    try:
        first.wait_ready(timeout=180)
        second.wait_ready(timeout=180)
        workers = await wait_listed(dispatcher, True, "api-two@localhost")
        one, two = (f"api-{n}@localhost (queues {QUEUE_API})" for n in ("one", "two"))
        assert workers == [one, two]

        second.stop()  # a clean shutdown removes its file
        assert await wait_listed(dispatcher, False, "api-two") == [one]
        assert not (tmp_path / "data" / "workers" / "api-two@localhost.json").exists()

        first.kill()  # SIGKILL: the file stays, the process is gone
        assert (tmp_path / "data" / "workers" / "api-one@localhost.json").exists()
        assert await listed(dispatcher) == []
    finally:
        first.kill()
        second.kill()
        await dispatcher.close()


def test_presence_is_only_for_the_embedded_broker(tmp_path: Path) -> None:
    broker = f"mirage-sqla+sqlite:///{tmp_path / 'broker.db'}"
    path = presence.announce(broker, "gpu-1@box", ["gpu", "api", "gpu"])
    assert path == tmp_path / "workers" / "gpu-1@box.json"
    # The bot publishes with the stock transport's URL: same folder, same workers.
    same = presence.present(f"sqla+sqlite:///{tmp_path / 'broker.db'}")
    assert [(w.name, w.pid, w.queues) for w in same] == [("gpu-1@box", os.getpid(), ("api", "gpu"))]
    assert presence.announce("redis://127.0.0.1:6379/0", "gpu-1@box", ["gpu"]) is None
    assert presence.present("amqp://guest@127.0.0.1//") == []
    (tmp_path / "workers" / "torn.json").write_text('{"name": "half')  # a write cut by a crash
    assert [w.name for w in presence.present(broker)] == ["gpu-1@box"]
    presence.withdraw(broker, "gpu-1@box")
    assert presence.present(broker) == []
