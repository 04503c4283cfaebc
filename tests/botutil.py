# Wait helpers take ``timeout=`` like the fake Discord's, and some poll rows or task states that
# have no event to wait on (another process writes them).
# ruff: noqa: ASYNC109, ASYNC110
"""Helpers for the bot tests: a running ``MirageBot`` against the fake Discord, a fake dispatcher,
and a real Celery worker process serving the tiny SDXL model.

The real worker consumes a queue whose name is unique to the test module, so parallel test runs
sharing the Redis server never take each other's jobs.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from bot.client import MirageBot
from bot.database import make_engine, make_sessionmaker, upgrade
from bot.dispatch import (
    FAILURE,
    PENDING,
    PROGRESS,
    REVOKED,
    STARTED,
    SUCCESS,
    CeleryDispatcher,
    TaskState,
    WorkerStatus,
)
from bot.models import Job, JobStatus, Member
from bot.settings import BotSettings
from bot.storage import LocalMediaStore
from tests.fakes import FakeDiscord, FakeInteraction
from workers.schema import (
    Engine,
    EngineReport,
    ErrorCode,
    ImageOut,
    JobError,
    JobRequest,
    JobResult,
    Layout,
    Progress,
    TaskOutcome,
    Timings,
    b64encode_bytes,
)

ROOT = Path(__file__).resolve().parent.parent
FAKE_TOKEN = "fake-bot-token"
GRID_IDS = 9  # U1-4, reroll, V1-4
EPHEMERAL = 64  # the message flag of a reply only its member sees


def make_settings(tmp: Path, database_url: str, **overrides: Any) -> BotSettings:
    """Settings for a test bot: no .env, temporary media, fast progress."""
    values: dict[str, Any] = {
        "discord_token": FAKE_TOKEN,
        "database_url": database_url,
        "broker_url": "redis://127.0.0.1:6379/0",
        "result_backend": "redis://127.0.0.1:6379/0",
        "media_dir": tmp / "media",
        "progress_edit_interval_s": 0.2,
        "public_url": "http://gallery.test",
    }
    values.update(overrides)
    return BotSettings(_env_file=None, **values)  # type: ignore[call-arg]


# --- a fake dispatcher ----------------------------------------------------------------------------


def png_bytes(
    width: int, height: int, color: tuple[int, int, int] = (200, 40, 40), noise: bool = False
) -> bytes:
    """A PNG of one colour (or random noise, which does not compress)."""
    if noise:
        image = PILImage.frombytes("RGB", (width, height), os.urandom(width * height * 3))
    else:
        image = PILImage.new("RGB", (width, height), color)
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


@dataclass
class FakeDispatcher:
    """Records sends and lets a test decide every task's state."""

    sent: list[JobRequest] = field(default_factory=list)
    revoked: list[str] = field(default_factory=list)
    forgotten: list[str] = field(default_factory=list)
    cleared: list[str] = field(default_factory=list)  # forgotten before a re-send: no marker left
    state: dict[str, TaskState] = field(default_factory=dict)
    queues: dict[Engine, str] = field(default_factory=lambda: {Engine.SDXL: "gpu", Engine.OPENAI: "api"})
    fail_sends: int = 0
    routed: dict[str, str] = field(default_factory=dict)  # job id → the queue it was sent to
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def send(self, request: JobRequest, engine: Engine) -> None:
        """Record the request (or fail, when asked to)."""
        if self.fail_sends:
            self.fail_sends -= 1
            raise ConnectionError("broker down (fake)")
        self.sent.append(request)
        self.routed[request.job_id] = self.queues[engine]
        self.state[request.job_id] = TaskState(request.job_id, PENDING)
        self._changed.set()

    async def states(self, job_ids: Sequence[str]) -> dict[str, TaskState]:
        """The states the test set, PENDING otherwise."""
        return {job_id: self.state.get(job_id, TaskState(job_id, PENDING)) for job_id in job_ids}

    async def revoke(self, job_id: str) -> None:
        """Record the revoke; the task reads as REVOKED from now on."""
        self.revoked.append(job_id)
        self.state[job_id] = TaskState(job_id, REVOKED)

    async def forget(self, job_id: str, *, done: bool = True) -> None:
        """Record that the bot dropped the result (``cleared`` too when it was before a re-send)."""
        self.forgotten.append(job_id)
        if not done:
            self.cleared.append(job_id)

    async def worker_status(self, ping_timeout: float = 1.0) -> WorkerStatus:
        """One imaginary worker, empty queues."""
        return WorkerStatus(workers=["fake@worker"], queue_depths={q: 0 for q in self.queues.values()})

    async def close(self) -> None:
        """Nothing to release."""

    # test controls

    def request(self, job_id: str) -> JobRequest:
        """The request sent for ``job_id``."""
        return next(r for r in self.sent if r.job_id == job_id)

    async def wait_sent(self, count: int, timeout: float = 5.0) -> list[JobRequest]:
        """Wait until at least ``count`` requests were sent."""
        async with asyncio.timeout(timeout):
            while len(self.sent) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.sent

    def start(self, job_id: str, percent: int = 0, preview: bytes | None = None) -> None:
        """Report the task as running (with a progress report when ``percent`` > 0)."""
        if percent:
            progress = Progress(
                job_id=job_id,
                percent=percent,
                preview=base64.b64encode(preview).decode() if preview else None,
            )
            self.state[job_id] = TaskState(job_id, PROGRESS, progress.model_dump(mode="json"))
        else:
            self.state[job_id] = TaskState(job_id, STARTED, {})

    def succeed(
        self,
        job_id: str,
        size: tuple[int, int] = (64, 64),
        noise: bool = False,
        notes: Sequence[str] = (),
        generation_s: float = 1.25,
    ) -> None:
        """Finish the task as a worker does: one composed grid (or single image), encoded once."""
        request = self.request(job_id)
        colors = [(220, 30, 30), (30, 220, 30), (30, 30, 220), (220, 220, 30)]
        width, height = size
        if request.count == 1:
            data, layout, full = png_bytes(width, height, colors[0], noise=noise), Layout.SINGLE, size
        else:
            grid = PILImage.new("RGB", (width * 2, height * 2))
            for i in range(4):
                tile = PILImage.open(io.BytesIO(png_bytes(width, height, colors[i], noise=noise)))
                grid.paste(tile, ((i % 2) * width, (i // 2) * height))
            out = io.BytesIO()
            grid.save(out, "PNG")
            data, layout, full = out.getvalue(), Layout.GRID, (width * 2, height * 2)
        result = JobResult(
            job_id=job_id,
            layout=layout,
            image=ImageOut(data_b64=b64encode_bytes(data), width=full[0], height=full[1]),
            tile_width=width,
            tile_height=height,
            seed=request.seed,
            timings=Timings(generation_s=generation_s, total_s=generation_s + 0.5),
            report=EngineReport(engine=Engine.SDXL, model="fake"),
            notes=list(notes),
        )
        self.finish(job_id, result)

    def finish(self, job_id: str, result: JobResult | dict[str, Any]) -> None:
        """Finish the task with this result (a dict stands for one of another schema version)."""
        payload = result if isinstance(result, dict) else result.model_dump(mode="json")
        self.state[job_id] = TaskState(job_id, SUCCESS, {"result": payload, "error": None})

    def fail(self, job_id: str, code: ErrorCode, message: str = "it broke") -> None:
        """Finish the task with an error outcome."""
        error = JobError(job_id=job_id, code=code, message=message)
        self.state[job_id] = TaskState(job_id, SUCCESS, TaskOutcome(error=error).model_dump(mode="json"))

    def crash(self, job_id: str, what: str = "WorkerLostError") -> None:
        """The task raised (Celery FAILURE)."""
        self.state[job_id] = TaskState(job_id, FAILURE, what)


# --- a real worker ------------------------------------------------------------------------------------


@dataclass
class WorkerProcess:
    """A ``python -m workers worker`` child process on a private queue."""

    queue: str
    hostname: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        """What the worker printed so far."""
        return self.log_path.read_text(errors="replace")


@contextmanager
def run_worker(model_dir: Path, redis_url: str, tmp: Path) -> Iterator[WorkerProcess]:
    """Start one prefork worker (concurrency 1) serving the tiny model; stop it afterwards."""
    queue = f"gpu-test-{secrets.token_hex(4)}"
    hostname = f"{queue}@localhost"
    env = {
        **os.environ,
        "SDXL_MODEL": str(model_dir),
        "BROKER_URL": redis_url,
        "RESULT_BACKEND": redis_url,
        "PROGRESS_INTERVAL_S": "0.2",
        "WARMUP": "true",
        "DEVICE": "cpu",
        "PYTHONUNBUFFERED": "1",
    }
    log_path = tmp / f"{queue}.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "workers", "worker", "--queues", queue, "--hostname", hostname],
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    worker = WorkerProcess(queue=queue, hostname=hostname, process=process, log_path=log_path)
    try:
        yield worker
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)


async def warm_worker(worker: WorkerProcess, redis_url: str, timeout: float = 120.0) -> None:
    """Wait for the worker to answer pings, then run one job so the model is loaded."""
    from workers.schema import GenerationParams, JobKind

    dispatcher = CeleryDispatcher.from_urls(redis_url, redis_url, queues={Engine.SDXL: worker.queue})
    try:
        async with asyncio.timeout(timeout):
            while True:
                if worker.process.poll() is not None:
                    raise RuntimeError(f"worker exited:\n{worker.log()}")
                status = await dispatcher.worker_status(ping_timeout=0.5)
                if worker.hostname in status.workers:
                    break
            job_id = secrets.token_urlsafe(16)
            request = JobRequest(
                job_id=job_id,
                kind=JobKind.IMAGINE,
                params=GenerationParams(prompt="warm up", steps=1),
                seed=1,
            )
            await dispatcher.send(request, Engine.SDXL)
            while not (await dispatcher.states([job_id]))[job_id].is_final:
                await asyncio.sleep(0.1)
            await dispatcher.forget(job_id)
    finally:
        await dispatcher.close()


# --- a running bot --------------------------------------------------------------------------------------


class NoDelayBot(MirageBot):
    """A MirageBot that skips discord.py's 5 s pause before a re-IDENTIFY."""

    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        """No pause in tests."""
        return None


@dataclass
class Harness:
    """One bot process connected to the fake Discord, over a database and a media store."""

    fake: FakeDiscord
    settings: BotSettings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    store: LocalMediaStore
    dispatcher: Any
    bot: MirageBot | None = None
    runner: asyncio.Task[None] | None = None

    async def start_bot(self, *, sync_commands: bool = True) -> MirageBot:
        """Start a (new) bot instance and wait until it is ready."""
        bot = NoDelayBot(
            settings=self.settings,
            sessions=self.sessions,
            store=self.store,
            dispatcher=self.dispatcher,
            poll_interval=0.05,
            sync_commands=sync_commands,
            guild_ready_timeout=0.05,
        )
        self.bot = bot
        self.runner = asyncio.create_task(bot.start(FAKE_TOKEN))
        async with asyncio.timeout(15):
            ready = asyncio.create_task(bot.wait_until_ready())
            done, _ = await asyncio.wait({ready, self.runner}, return_when=asyncio.FIRST_COMPLETED)
            if self.runner in done:
                ready.cancel()
                self.runner.result()
        return bot

    async def stop_bot(self) -> None:
        """Close the bot (its tracker stops with it)."""
        if self.bot is not None:
            await self.bot.close()
        if self.runner is not None:
            try:
                await asyncio.wait_for(self.runner, 10)
            except (asyncio.CancelledError, Exception):
                pass
        self.bot = None
        self.runner = None

    async def restart_bot(self) -> MirageBot:
        """A new bot process over the same database and media (as after a crash or deploy)."""
        await self.stop_bot()
        return await self.start_bot()

    async def imagine(self, prompt: str, **kwargs: Any) -> FakeInteraction:
        """``/imagine prompt:…``."""
        return await self.fake.slash("imagine", {"prompt": prompt}, **kwargs)

    async def job_for(self, interaction: FakeInteraction, timeout: float = 5.0) -> Job:
        """The job row created for an interaction (matched by its token)."""
        async with asyncio.timeout(timeout):
            while True:
                async with self.sessions() as session:
                    job = (
                        await session.scalars(select(Job).where(Job.interaction_token == interaction.token))
                    ).first()
                if job is not None:
                    return job
                await asyncio.sleep(0.02)

    async def job(self, job_id: str) -> Job:
        """A fresh copy of a job row."""
        async with self.sessions() as session:
            job = await session.get(Job, job_id)
            assert job is not None
            return job

    async def wait_job(self, job_id: str, predicate: Callable[[Job], bool], timeout: float = 10.0) -> Job:
        """Poll a job row until ``predicate`` holds."""
        async with asyncio.timeout(timeout):
            while True:
                job = await self.job(job_id)
                if predicate(job):
                    return job
                await asyncio.sleep(0.02)

    async def settle(self, ticks: int = 3, timeout: float = 5.0) -> None:
        """Wait until the tracker has run ``ticks`` more passes (for checks that nothing happens)."""
        assert self.bot is not None
        target = self.bot.tracker.ticks + ticks
        async with asyncio.timeout(timeout):
            while self.bot.tracker.ticks < target:
                self.bot.tracker.wake()
                await asyncio.sleep(0.01)

    async def job_count(self) -> int:
        """How many jobs exist."""
        async with self.sessions() as session:
            return len((await session.scalars(select(Job.id))).all())


def custom_ids(message: dict[str, Any]) -> list[str]:
    """All custom_ids of a message's components, in order (link buttons have none)."""
    return [
        c["custom_id"]
        for row in message.get("components") or []
        for c in row.get("components") or []
        if "custom_id" in c
    ]


def row_sizes(message: dict[str, Any]) -> list[int]:
    """How many components each row of a message has."""
    return [len(row.get("components") or []) for row in message.get("components") or []]


def labels(message: dict[str, Any]) -> list[str]:
    """Button labels (emoji name when there is no label)."""
    out = []
    for row in message.get("components") or []:
        for c in row.get("components") or []:
            out.append(c.get("label") or (c.get("emoji") or {}).get("name", ""))
    return out


def has_result(message: dict[str, Any]) -> bool:
    """A delivered result: an attachment and buttons other than Cancel.

    A progress edit also carries an attachment (its preview) and a button (Cancel, ``mj:x:``), so
    those alone do not tell a result from a progress message.
    """
    components = [c for row in message.get("components") or [] for c in row.get("components") or []]
    not_cancel = [c for c in components if not str(c.get("custom_id", "")).startswith("mj:x:")]
    return bool(message.get("attachments")) and bool(not_cancel)


async def finish_grid(h: Harness, prompt: str, **kwargs: Any) -> tuple[Job, dict[str, Any]]:
    """Run an /imagine through the fake dispatcher to a delivered grid."""
    inter = await h.imagine(prompt, **kwargs)
    job = await h.job_for(inter)
    await h.wait_job(job.id, lambda j: j.status == JobStatus.QUEUED)
    h.dispatcher.succeed(job.id)
    h.bot.tracker.wake()
    message = await inter.wait_original(has_result)
    return await h.wait_job(job.id, lambda j: j.message_id is not None), message


def result_message_ids(h: Harness, inter: FakeInteraction, job_id: str) -> set[str]:
    """Distinct Discord messages that carried the job's result (re-edits of one message count once)."""
    ids = {
        str(inter.original_message_id)
        for r in inter.requests
        if r.route == "webhook_message_edit" and r.status == 200 and r.files and r.custom_ids()
    }
    ids |= {
        str((r.response or {}).get("id"))
        for r in h.fake.requests
        if r.route == "channel_message_create" and r.status == 200 and f":{job_id}" in str(r.custom_ids())
    }
    return ids


async def attachment_bytes(fake: FakeDiscord, message: dict[str, Any], index: int = 0) -> bytes:
    """Download an attachment from the fake (as a Discord client would)."""
    import aiohttp

    async with aiohttp.ClientSession() as http, http.get(message["attachments"][index]["url"]) as response:
        assert response.status == 200
        return await response.read()


def image_of(data: bytes) -> PILImage.Image:
    """Bytes to a loaded RGB image."""
    with PILImage.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert("RGB")


@asynccontextmanager
async def bot_harness(
    tmp: Path,
    database_url: str,
    dispatcher: Any,
    *,
    fake: FakeDiscord | None = None,
    start: bool = True,
    **settings: Any,
) -> AsyncIterator[Harness]:
    """A migrated database, a media store, the fake Discord and a started bot; all torn down after."""
    await asyncio.to_thread(upgrade, database_url)
    engine = make_engine(database_url)
    own_fake = fake is None
    fake = fake or FakeDiscord(token=FAKE_TOKEN)
    if own_fake:
        await fake.start()
        fake.install()
    config = make_settings(tmp, database_url, **settings)
    harness = Harness(
        fake=fake,
        settings=config,
        engine=engine,
        sessions=make_sessionmaker(engine),
        store=LocalMediaStore(Path(config.media_dir)),
        dispatcher=dispatcher,
    )
    try:
        if start:
            await harness.start_bot()
        yield harness
    finally:
        await harness.stop_bot()
        if own_fake:
            await fake.stop()
        await engine.dispose()


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.02) -> bool:
    """Synchronous polling helper for thread-side checks."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


async def credits_used(h: Harness, user_id: int) -> int:
    """Allowance credits the member has spent this period (0 before their first job)."""
    async with h.sessions() as session:
        member = (await session.scalars(select(Member).where(Member.user_id == user_id))).first()
        return 0 if member is None else member.credits_used


async def press_and_wait(h: Harness, custom_id: str, message: dict[str, Any], **kwargs: Any) -> Any:
    """Press a button on a message and wait for Discord's answer to the press."""
    press = await h.fake.press(custom_id, message, **kwargs)
    callback = await press.callback()
    return press, callback


async def reply_of(h: Harness, inter: Any) -> dict[str, Any]:
    """The ephemeral answer of a deferred command (its first followup edits the deferral)."""
    request = await h.fake.wait_for_request(
        lambda r: r.interaction_token == inter.token and r.route == "webhook_execute"
    )
    return request.message_payload


async def private_followup(h: Harness, inter: Any) -> dict[str, Any]:
    """The first private message sent after the command was deferred."""
    request = await h.fake.wait_for_request(
        lambda r: (
            r.interaction_token == inter.token
            and r.route == "webhook_execute"
            and bool((r.message_payload.get("flags") or 0) & EPHEMERAL)
        )
    )
    return request.message_payload


async def refused_for_free(h: Harness, command: str, options: dict[str, Any]) -> str:
    """``/command`` with ``options`` (uploaded attachments included) refused privately: the text.

    Checks that the refusal says nothing was charged, and that no job and no credit went to it.
    """
    inter = await h.fake.slash(command, options)
    refusal = (await private_followup(h, inter))["content"]
    assert "Nothing was charged" in refusal
    assert await h.job_count() == 0 and await credits_used(h, h.fake.user.id) == 0
    return refusal


def styles(message: dict[str, Any]) -> dict[str, int]:
    """custom_id → button style of a message (link buttons have no custom_id)."""
    return {
        c["custom_id"]: c["style"]
        for row in message.get("components") or []
        for c in row.get("components") or []
        if "custom_id" in c
    }
