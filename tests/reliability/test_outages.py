# Polling loops wait on rows and task states other processes write (no event to wait on), always
# under a timeout.
"""Infrastructure outages: Redis restarted under the bot, PostgreSQL briefly unreachable; no job is lost.

- Redis: a *private* ``redis-server`` (AOF, fsync on every write) is the broker and result backend
  of the bot and of one real worker serving the tiny model. It is SIGKILLed; ``/imagine``
  commands accepted meanwhile stay waiting in the database with the member shown "Waiting to
  start"; Redis is started again on the same port and every job is dispatched and delivered,
  exactly once, each charged once.
- PostgreSQL: the bot reaches the shared server through a TCP proxy that the test cuts (open
  connections reset, new ones refused). An ``/imagine`` during the cut gets a clear private
  answer and costs nothing; after the proxy comes back, a job that finished during the cut is
  delivered and new commands work, with no manual step.

The shared Redis and PostgreSQL servers are never stopped: only the private server and the proxy
are broken.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import select

from bot.dispatch import CeleryDispatcher
from bot.models import CreditEntry, Job, JobStatus, Member
from tests.botutil import (
    FakeDispatcher,
    Harness,
    WorkerProcess,
    bot_harness,
    has_result,
    result_message_ids,
    run_worker,
    warm_worker,
)
from tests.fakes import FakeInteraction
from workers.schema import Engine

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(180)]

EPHEMERAL = 64
# Filled in by the tests so docs/reliability.md can quote what was measured (printed with -s).
MEASURED: dict[str, float] = {}


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- a private Redis that can be killed -------------------------------------------------------------


class PrivateRedis:
    """A ``redis-server`` child on its own port and directory, killable and restartable.

    ``appendfsync always`` makes every acknowledged write durable, so a SIGKILL loses nothing
    that Redis had accepted (the production compose file uses AOF too).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The server's URL."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait until it answers PING."""
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not on PATH"
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise
                time.sleep(0.05)
        client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    """One private Redis server for the module."""
    server = PrivateRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def redis_worker(
    private_redis: PrivateRedis, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """A warmed-up real worker whose broker and result backend are the private Redis."""
    with run_worker(tiny_model_dir, private_redis.url, tmp_path_factory.mktemp("worker")) as proc:
        asyncio.run(warm_worker(proc, private_redis.url))
        yield proc


@contextlib.asynccontextmanager
async def redis_bot(
    private_redis: PrivateRedis, worker: WorkerProcess, tmp_path: Path, sqlite_url: str
) -> AsyncIterator[Harness]:
    """A started bot whose dispatcher, broker and result backend are the private Redis."""
    dispatcher = CeleryDispatcher.from_urls(
        private_redis.url, private_redis.url, queues={Engine.SDXL: worker.queue}
    )
    try:
        async with bot_harness(
            tmp_path, sqlite_url, dispatcher, broker_url=private_redis.url, result_backend=private_redis.url
        ) as h:
            yield h
    finally:
        await dispatcher.close()


async def assert_exactly_once(h: Harness, inters: list[FakeInteraction]) -> None:
    """Every interaction's job is done, delivered in one message, and charged once."""
    async with h.sessions() as session:
        ledger = (await session.execute(select(CreditEntry.job_id, CreditEntry.kind))).all()
    for inter in inters:
        job = await h.job_for(inter)
        # The message id is written just after Discord confirms the message the test saw.
        job = await h.wait_job(job.id, lambda j: j.message_id is not None)
        assert job.status == JobStatus.DONE.value and job.delivered and job.message_id, job.id
        assert len(result_message_ids(h, inter, job.id)) == 1, job.id
        assert ledger.count((job.id, "reserve")) == 1 and ledger.count((job.id, "refund")) == 0


async def test_redis_killed_and_restarted(
    private_redis: PrivateRedis, redis_worker: WorkerProcess, tmp_path: Path, sqlite_url: str
) -> None:
    async with redis_bot(private_redis, redis_worker, tmp_path, sqlite_url) as h:
        # The path works before anything breaks.
        before = await h.imagine("before the outage --steps 2")
        # Delivered, not merely showing progress (a progress message has a preview and Cancel).
        await h.wait_job((await h.job_for(before)).id, lambda j: j.message_id is not None, timeout=60)

        private_redis.kill()
        members = [h.fake.add_member(h.fake.guild, f"outage{i}") for i in range(3)]
        during = [
            await h.imagine(f"while redis is down {i} --steps 2", user=m) for i, m in enumerate(members)
        ]
        for inter in during:
            # Accepted (the database is fine) and told clearly it waits; never refused.
            message = await inter.wait_original(
                lambda m: "Waiting to start" in (m.get("content") or ""), timeout=15
            )
            assert "❌" not in message["content"]
            job = await h.job_for(inter)
            assert job.status == JobStatus.WAITING.value and job.cost == 1
        # The release loop keeps trying while the broker is gone: still waiting, not failed.
        async with h.sessions() as session:
            statuses = set((await session.scalars(select(Job.status))).all())
        assert statuses == {JobStatus.DONE.value, JobStatus.WAITING.value}

        restarted = time.monotonic()
        private_redis.start()
        for inter in during:
            await inter.wait_original(has_result, timeout=90)
        recovery_s = time.monotonic() - restarted
        await assert_exactly_once(h, [before, *during])
        async with h.sessions() as session:
            used = (await session.scalars(select(Member.credits_used))).all()
        assert sorted(used) == [1, 1, 1, 1]
        MEASURED["redis_recovery_s"] = recovery_s
        print(f"\nredis outage: {len(during)} jobs delivered {recovery_s:.1f}s after the restart")


async def test_redis_restarted_under_running_and_queued_jobs(
    private_redis: PrivateRedis, redis_worker: WorkerProcess, tmp_path: Path, sqlite_url: str
) -> None:
    """The result store vanishes while one job runs and two are queued: a blip, not three refunds."""
    async with redis_bot(private_redis, redis_worker, tmp_path, sqlite_url) as h:
        members = [h.fake.add_member(h.fake.guild, f"inflight{i}") for i in range(3)]
        inters = [
            await h.imagine(f"in flight {i} --steps 60 --seed {i}", user=m) for i, m in enumerate(members)
        ]
        jobs = [await h.job_for(inter) for inter in inters]
        await h.wait_job(jobs[0].id, lambda j: j.status == JobStatus.RUNNING.value, timeout=60)
        private_redis.kill()
        # The bot has met the outage (failed reads, backing off) before Redis comes back.
        async with asyncio.timeout(30):
            while h.dispatcher.backoff.failures < 2:  # noqa: ASYNC110 - another thread's counter
                await asyncio.sleep(0.05)
        async with h.sessions() as session:
            statuses = set((await session.scalars(select(Job.status))).all())
        assert JobStatus.FAILED.value not in statuses
        restarted = time.monotonic()
        private_redis.start()
        for job in jobs:
            await h.wait_job(job.id, lambda j: j.message_id is not None, timeout=120)
        recovery_s = time.monotonic() - restarted
        await assert_exactly_once(h, inters)
        MEASURED["redis_inflight_recovery_s"] = recovery_s
        print(f"\nredis restart under {len(jobs)} in-flight jobs: all delivered {recovery_s:.1f}s later")


# --- PostgreSQL through a proxy that can be cut ----------------------------------------------------


class CuttableProxy:
    """A TCP proxy on 127.0.0.1 in front of a real server; ``cut()`` resets every connection and
    refuses new ones (as a crashed or restarting database would), ``restore()`` listens again."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def restore(self) -> None:
        """Listen (again) on the same port."""
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

    async def cut(self) -> None:
        """Stop listening and abort every open connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.transport.abort()
            return
        self._writers |= {client_w, server_w}

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            writer.transport.abort()

        await asyncio.gather(pipe(client_r, server_w), pipe(server_r, client_w))
        self._writers -= {client_w, server_w}


@pytest.fixture
async def proxy() -> AsyncIterator[CuttableProxy]:
    """A proxy in front of the shared PostgreSQL server."""
    from tests.conftest import POSTGRES_URL

    port = int(POSTGRES_URL.split("@", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
    server = CuttableProxy("127.0.0.1", port)
    await server.restore()
    try:
        yield server
    finally:
        await server.cut()


@pytest.mark.postgres
async def test_postgres_outage(proxy: CuttableProxy, pg_url: str, tmp_path: Path) -> None:
    url = pg_url.replace("@127.0.0.1:5432/", f"@127.0.0.1:{proxy.port}/")
    assert url != pg_url
    async with bot_harness(tmp_path, url, FakeDispatcher()) as h:
        dispatcher: FakeDispatcher = h.dispatcher
        in_flight = await h.imagine("in flight during the outage")
        job = await h.job_for(in_flight)
        await h.wait_job(job.id, lambda j: j.status == JobStatus.QUEUED.value)

        await proxy.cut()
        # The worker finishes while the bot cannot write down the result.
        dispatcher.succeed(job.id)
        h.bot.tracker.wake()
        member = h.fake.add_member(h.fake.guild, "unlucky")
        refused = await h.imagine("during the outage", user=member)
        callback = await refused.callback()
        assert callback.status == 200 and callback.callback_type in (4, 5)  # answered within 3 s
        if callback.callback_type == 4:
            # The database failed fast: the refusal is the private answer itself.
            answer = callback.message_payload
        else:
            # The database hung past the preferences budget: a public "thinking…" first, then
            # deleted and replaced by a private followup.
            [followup] = await refused.followups(1, timeout=30)
            answer = followup.json
            await h.fake.wait_for_request(
                lambda r: r.route == "webhook_message_delete" and r.interaction_token == refused.token,
                timeout=10,
            )
        assert answer["flags"] & EPHEMERAL
        text = answer["content"]
        assert "database" in text and "nothing was charged" in text, text
        assert "Traceback" not in text and "psycopg" not in text.lower()
        assert in_flight.original_message() is None or not has_result(in_flight.original_message() or {})

        restored = time.monotonic()
        await proxy.restore()
        await in_flight.wait_original(has_result, timeout=30)
        recovery_s = time.monotonic() - restored

        after = await h.imagine("after the outage", user=member)
        new_job = await h.job_for(after)
        await h.wait_job(new_job.id, lambda j: j.status == JobStatus.QUEUED.value)
        dispatcher.succeed(new_job.id)
        h.bot.tracker.wake()
        await after.wait_original(has_result, timeout=15)

        async with h.sessions() as session:
            rows = (await session.execute(select(Job.interaction_token, Job.status))).all()
            used = {m.user_id: m.credits_used for m in (await session.scalars(select(Member))).all()}
        assert refused.token not in {token for token, _status in rows}  # no job for the refusal
        assert {status for _token, status in rows} == {JobStatus.DONE.value}
        assert used[int(member.user.id)] == 1  # only the post-outage job
        assert used[h.fake.user.id] == 1
        await assert_exactly_once(h, [in_flight, after])
        MEASURED["postgres_recovery_s"] = recovery_s
        print(f"\npostgres outage: in-flight job delivered {recovery_s:.2f}s after the restore")
