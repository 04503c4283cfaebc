# Polling loops wait on rows and task states other processes write (no event to wait on), always
# under a timeout.
"""RabbitMQ, the production broker, killed and restarted under the bot and a real worker.

A *private* RabbitMQ node (its own ports, data folder and node name; the shared server is never
touched) is the broker of the real bot and of one real worker serving the tiny model; results go
to Redis, as in the production compose file. While one job runs and two wait in the queue, the
node is SIGKILLed (a crash: no clean shutdown), an ``/imagine`` arrives during the outage, and the
node is started again on the same data folder. Every job must be delivered in one message and
charged once, none refunded:

- the running job's result reaches Redis while the broker is gone and is delivered at once;
  its unacknowledged message comes back after the restart and is not run twice (deduplicated
  against the stored SUCCESS, or recomputed under the same id and ignored by the bot);
- the two queued jobs are persistent messages in a durable queue: they survive the crash;
- the job accepted during the outage waits in the database ("Waiting to start") and is sent
  once the broker is back.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu import Connection
from sqlalchemy import select

from bot.dispatch import CeleryDispatcher
from bot.models import CreditEntry, JobStatus
from tests.botutil import bot_harness, has_result, result_message_ids
from tests.conftest import REQUIRE_SERVICES, fresh_redis_db
from tests.workerutil import WorkerProcess, worker_env
from workers.schema import Engine

pytestmark = [pytest.mark.reliability, pytest.mark.slow, pytest.mark.timeout(420)]

RESULTS_DB = 7  # this module's Redis database for results, flushed first
STEPS = 75  # still running on the tiny model when the broker dies
MEASURED: dict[str, float] = {}


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rabbitmq_script() -> Path | None:
    """RabbitMQ's own start script, not the distribution's wrapper (which switches to the
    ``rabbitmq`` user and its fixed data folder)."""
    found = shutil.which("rabbitmq-server") or (
        "/usr/sbin/rabbitmq-server" if Path("/usr/sbin/rabbitmq-server").exists() else None
    )
    if found is None:
        return None
    real = Path(found).resolve()
    script = real.parent / "rabbitmq-server"
    return script if script.exists() else real


class PrivateRabbitMQ:
    """A RabbitMQ node of its own, on free ports, with its data in ``directory``; killable."""

    def __init__(self, directory: Path, script: Path) -> None:
        self.directory = directory
        self.script = script
        self.port = free_port()
        self.dist_port = free_port()
        self.node = f"mirage-test-{self.port}@localhost"
        self.process: subprocess.Popen[bytes] | None = None
        (directory / "enabled_plugins").write_text("[].\n")

    @property
    def url(self) -> str:
        """The node's AMQP URL."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def _env(self) -> dict[str, str]:
        d = self.directory
        return {
            **os.environ,
            "HOME": str(d),  # the Erlang cookie lives here
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq"),  # absent: defaults
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": str(d / "node.pid"),
        }

    def start(self, timeout: float = 120.0) -> None:
        """Start the node and wait until it accepts an AMQP connection."""
        with open(self.directory / "console.log", "ab") as log:
            self.process = subprocess.Popen(
                [str(self.script)],
                cwd=self.directory,
                env=self._env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # one group: the start script and the Erlang VM under it
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                with Connection(self.url, connect_timeout=1) as conn:
                    conn.connect()
                return
            except Exception:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"RabbitMQ did not start:\n{self.console()[-3000:]}") from None
                time.sleep(0.2)

    def console(self) -> str:
        """What the node printed."""
        path = self.directory / "console.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def kill(self) -> None:
        """SIGKILL the node's whole process group: a crash, no clean shutdown."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)


@pytest.fixture
def rabbitmq(tmp_path: Path) -> Iterator[PrivateRabbitMQ]:
    """A started private node, killed after the test."""
    script = rabbitmq_script()
    if script is None:
        if REQUIRE_SERVICES:
            pytest.fail("rabbitmq-server is required (MIRAGE_REQUIRE_SERVICES=1) but is not installed")
        pytest.skip("rabbitmq-server is not installed")
    folder = tmp_path / "rabbitmq"
    folder.mkdir()
    node = PrivateRabbitMQ(folder, script)
    node.start()
    try:
        yield node
    finally:
        node.kill()


@pytest.fixture
def results_url() -> str:
    """The module's own Redis database for results, empty."""
    return fresh_redis_db(RESULTS_DB)


async def test_rabbitmq_killed_and_restarted_under_running_and_queued_jobs(
    rabbitmq: PrivateRabbitMQ, results_url: str, tiny_model_dir: Path, tmp_path: Path, sqlite_url: str
) -> None:
    queue = f"gpu-rmq-{secrets.token_hex(4)}"
    worker = WorkerProcess(
        worker_env(tiny_model_dir, rabbitmq.url, results_url), tmp_path / "worker.log", queues=queue
    ).start()
    dispatcher = CeleryDispatcher.from_urls(rabbitmq.url, results_url, queues={Engine.SDXL: queue})
    try:
        worker.wait_ready(timeout=180)
        async with bot_harness(
            tmp_path, sqlite_url, dispatcher, broker_url=rabbitmq.url, result_backend=results_url
        ) as h:
            members = [h.fake.add_member(h.fake.guild, f"rmq{i}") for i in range(4)]
            # One job running (the worker's concurrency is 1), then two more sent behind it: they
            # wait in RabbitMQ's queue, confirmed on disk before the bot marks them queued.
            running = await h.imagine(f"running at the crash --steps {STEPS} --seed 1", user=members[0])
            first = await h.job_for(running)
            await h.wait_job(
                first.id, lambda j: j.status == JobStatus.RUNNING and j.progress > 0, timeout=180
            )
            queued = [
                await h.imagine(f"queued at the crash {i} --steps 2 --seed {i}", user=m)
                for i, m in enumerate(members[1:3])
            ]
            for inter in queued:
                job = await h.job_for(inter)
                await h.wait_job(job.id, lambda j: j.status == JobStatus.QUEUED.value, timeout=60)
            before = [running, *queued]
            assert (await h.job(first.id)).status == JobStatus.RUNNING.value  # still mid-job

            rabbitmq.kill()
            killed = time.monotonic()
            during = await h.imagine("while rabbitmq is down --steps 2 --seed 9", user=members[3])
            message = await during.wait_original(
                lambda m: "Waiting to start" in (m.get("content") or ""), timeout=30
            )
            assert "❌" not in message["content"]

            rabbitmq.start()
            restarted = time.monotonic()
            inters = [*before, during]
            for inter in inters:
                job = await h.job_for(inter)
                await h.wait_job(job.id, lambda j: j.message_id is not None, timeout=240)
            recovery_s = time.monotonic() - restarted

            async with h.sessions() as session:
                ledger = (await session.execute(select(CreditEntry.job_id, CreditEntry.kind))).all()
            for inter in inters:
                job = await h.job((await h.job_for(inter)).id)
                assert job.status == JobStatus.DONE.value and job.delivered, (job.id, worker.log()[-3000:])
                assert len(result_message_ids(h, inter, job.id)) == 1, job.id
                assert ledger.count((job.id, "reserve")) == 1 and ledger.count((job.id, "refund")) == 0
                assert has_result(await inter.wait_original(has_result, timeout=30))
            assert worker.exited() is False  # the worker rode out the outage; nobody restarted it
            MEASURED["rabbitmq_recovery_s"] = round(recovery_s, 1)
            since_kill = time.monotonic() - killed
            print(
                f"\nrabbitmq SIGKILL under 1 running + 2 queued jobs (+1 accepted while down): all "
                f"delivered {recovery_s:.1f}s after the restart ({since_kill:.1f}s after the kill)"
            )
    finally:
        await dispatcher.close()
        worker.stop()
