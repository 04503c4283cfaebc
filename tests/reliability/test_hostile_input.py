"""Hostile input through the real discord.py client against the fake Discord.

- fuzzed /imagine prompts (hypothesis): every one gets an answer, ephemeral when refused, and the
  bot logs no error;
- an over-long prompt is refused privately and charges nothing;
- forged button custom_ids (another member's stealth job, a missing job, malformed ids) get an
  ephemeral refusal that reveals nothing, or are ignored; never an exception, never a charge;
- an "image" that is not an image as the input of a V# or U# press: the job fails, the credit comes
  back and the member is told why.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, select

from bot.models import Image, Job, JobStatus, Member
from tests.botutil import FakeDispatcher, Harness, bot_harness, finish_grid
from workers.schema import ErrorCode

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(120)]

EPHEMERAL = 64
ANSWER_TIMEOUT_S = 5.0
CORRUPT = b"\x89PNG\r\n\x1a\n this is not an image at all"


class ErrorRecords(logging.Handler):
    """Collects ERROR-and-above records from every logger (discord.py logs handler crashes there)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        """Keep the record."""
        self.records.append(record)

    def text(self) -> str:
        """The collected records, formatted with tracebacks, for assertion messages."""
        formatter = logging.Formatter("%(name)s: %(message)s")
        return "\n".join(formatter.format(r) for r in self.records)


@pytest.fixture
def errors() -> Iterator[ErrorRecords]:
    """Errors logged during the test."""
    handler = ErrorRecords()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


async def credits_used(h: Harness, user_id: int) -> int:
    """Credits the member has used (0 when unknown)."""
    async with h.sessions() as session:
        member = (await session.scalars(select(Member).where(Member.user_id == user_id))).first()
        return 0 if member is None else member.credits_used


async def answer_of(h: Harness, inter: Any) -> tuple[str, dict[str, Any]]:
    """How the bot answered a command: ``("refused", payload)`` (ephemeral) or ``("accepted", message)``."""
    callback = await inter.callback(timeout=ANSWER_TIMEOUT_S)
    assert callback.status == 200
    if callback.callback_type == 4:
        payload = callback.message_payload
        assert payload["flags"] & EPHEMERAL, payload
        return "refused", payload
    assert callback.callback_type == 5
    reply = await h.fake.wait_for_request(
        lambda r: (
            r.interaction_token == inter.token
            and r.route in ("webhook_execute", "webhook_message_edit")
            and r.status == 200
        ),
        timeout=ANSWER_TIMEOUT_S,
    )
    if reply.route == "webhook_execute":  # a refusal after the deferral is a private followup
        assert reply.message_payload["flags"] & EPHEMERAL, reply.message_payload
        return "refused", reply.message_payload
    return "accepted", reply.message_payload


def forged(message: dict[str, Any], custom_id: str) -> dict[str, Any]:
    """A message carrying one button with ``custom_id`` (as a modified client could send)."""
    out = dict(message)
    out["components"] = [
        {"type": 1, "components": [{"type": 2, "style": 2, "label": "X", "custom_id": custom_id}]}
    ]
    out["id"] = "1"  # not a stored message: the fake sends the forged components as they are
    return out


# --- fuzzed prompts ------------------------------------------------------------------------------------

FRAGMENTS = [
    "a cat",
    "--ar",
    "--ar 99999:1",
    "--ar 0:0",
    "--ar 16:9",
    "--seed",
    "--seed 99999999999999999999",
    "--seed -1",
    "--chaos 1e9",
    "--no",
    "--no --no",
    "--stealth --public",
    "--model",
    "--model ../../etc/passwd",
    "—ar 2:3",
    "::",
    "@everyone",
    "<@&123456>",
    "<@1>",
    "**bold** `code` ||spoiler||",
    "\n2026-01-01 ERROR forged log line\r\n",
    "\x00\x1b[31m",
    "\u202e\u200b",
    "🦊" * 20,
    "'; DROP TABLE jobs; --",
    "{0} %s %(x)s",
    "https://evil.example/x.png",
]

PROMPTS = st.one_of(
    st.text(min_size=1, max_size=300),
    st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=6).map(" ".join),
    st.tuples(st.text(max_size=40), st.sampled_from(FRAGMENTS), st.text(max_size=40)).map("".join),
)


async def _drain() -> None:
    """Cancel what is left on this loop and give in-flight database calls time to return."""
    pending = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    await asyncio.sleep(0.1)


@pytest.fixture
def fuzz_bot(tmp_path: Path, errors: ErrorRecords) -> Iterator[tuple[asyncio.AbstractEventLoop, Harness]]:
    """One bot for all hypothesis examples, on a loop of its own (``@given`` tests are sync)."""
    loop = asyncio.new_event_loop()
    manager = bot_harness(
        tmp_path,
        f"sqlite+aiosqlite:///{tmp_path / 'fuzz.db'}",
        FakeDispatcher(),
        credit_limit=10_000,
        max_waiting_per_member=10_000,
    )
    harness = loop.run_until_complete(manager.__aenter__())
    try:
        yield loop, harness
    finally:
        loop.run_until_complete(manager.__aexit__(None, None, None))
        # Jobs accepted by the fuzz may still have tasks mid-query; end them and let aiosqlite's
        # thread hand back its last results before the loop closes (else it warns from its thread).
        loop.run_until_complete(_drain())
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=PROMPTS)
def test_fuzzed_prompts_always_get_an_answer(
    fuzz_bot: tuple[asyncio.AbstractEventLoop, Harness], errors: ErrorRecords, prompt: str
) -> None:
    loop, h = fuzz_bot

    async def check() -> None:
        before = await h.job_count()
        used_before = await credits_used(h, h.fake.user.id)
        inter = await h.imagine(prompt)
        outcome, payload = await answer_of(h, inter)
        event(outcome)  # shown by --hypothesis-show-statistics: both kinds should occur
        if outcome == "refused":
            assert payload.get("content"), "a refusal says why"
            assert await h.job_count() == before
            assert await credits_used(h, h.fake.user.id) == used_before
        else:
            job = await h.job_for(inter)
            assert job.cost == 1 and await credits_used(h, h.fake.user.id) == used_before + 1
            # A prompt can never ping anyone but the owner.
            mentions = payload.get("allowed_mentions") or {}
            assert "everyone" not in mentions.get("parse", []) and "roles" not in mentions.get("parse", [])

    loop.run_until_complete(check())
    assert not errors.records, errors.text()


# --- fixed hostile cases -----------------------------------------------------------------------------------


@pytest.fixture
async def h(tmp_path: Path, sqlite_url: str) -> Any:
    """A bot over SQLite with a fake dispatcher."""
    async with bot_harness(tmp_path, sqlite_url, FakeDispatcher()) as harness:
        yield harness


async def test_over_long_prompt_is_refused_privately_and_free(h: Harness, errors: ErrorRecords) -> None:
    inter = await h.imagine("a very long prompt " * 263 + "end")  # 5000 characters
    outcome, payload = await answer_of(h, inter)
    assert outcome == "refused"
    assert "the limit is" in payload["content"] and len(payload["content"]) < 2000
    assert await h.job_count() == 0 and await credits_used(h, h.fake.user.id) == 0
    assert h.dispatcher.sent == [] and not errors.records


STEALTH_PRESSES = [
    "mj:u:{id}:1",
    "mj:v:{id}:2",
    "mj:r:{id}",
    "mj:vary:{id}:subtle",
    "mj:up:{id}:creative",
    "mj:zoom:{id}:2",
    "mj:pan:{id}:l",
    "mj:sq:{id}",
]


async def test_forged_presses_on_someone_elses_stealth_job_reveal_nothing(
    h: Harness, errors: ErrorRecords
) -> None:
    job, message = await finish_grid(h, "my hidden lighthouse --stealth")
    mallory = h.fake.add_member(h.fake.guild, "mallory").user
    count = await h.job_count()
    for template in STEALTH_PRESSES:
        custom_id = template.format(id=job.id)
        press = await h.fake.press(custom_id, forged(message, custom_id), user=mallory)
        callback = await press.callback()
        assert callback.callback_type == 4, custom_id
        payload = callback.message_payload
        assert payload["flags"] & EPHEMERAL, custom_id
        assert "hidden" not in payload["content"] and "lighthouse" not in payload["content"], custom_id
        assert not payload.get("attachments") and not payload.get("embeds"), custom_id
    assert await h.job_count() == count
    assert await credits_used(h, mallory.id) == 0
    assert not errors.records, errors.text()


MALFORMED = [
    "mj:u:../../etc:9",
    "mj:zoom:{id}:7",
    "mj:u:{id}:0",
    "mj:v:{id}:5",
    "mj:vary:{id}:extreme",
    "mj:pan:{id}:x",
    "mj:up:{id}",
    "mj:r:{id}:1",
    "mj:u:{id}:1:1",
    "mj:",
    "mj:u::1",
    "mj:nope:{id}",
    "mj:u:" + "A" * 90 + ":1",
    "mj:u:%00%2e%2e:1",
    "mj:r:🦊",
    "x" * 100,
]


async def test_malformed_custom_ids_are_answered_or_ignored(h: Harness, errors: ErrorRecords) -> None:
    job, message = await finish_grid(h, "target")
    count, used = await h.job_count(), await credits_used(h, h.fake.user.id)
    presses = []
    for template in MALFORMED:
        custom_id = template.format(id=job.id)
        presses.append((custom_id, await h.fake.press(custom_id, forged(message, custom_id))))
    await asyncio.sleep(0.5)  # answers come well within this; ignored presses get none
    for custom_id, press in presses:
        callbacks = [r for r in press.requests if r.route == "interaction_callback"]
        for callback in callbacks:  # an answer, if any, is private and carries no result
            assert callback.callback_type == 4 and callback.message_payload["flags"] & EPHEMERAL, custom_id
    assert await h.job_count() == count
    assert await credits_used(h, h.fake.user.id) == used
    assert h.dispatcher.sent[-1].job_id == job.id  # nothing new was sent to a worker
    assert not errors.records, errors.text()
    # The bot is unharmed: a genuine press on the real message still works.
    press = await h.fake.press(f"mj:r:{job.id}", message)
    assert (await press.callback()).callback_type == 5
    await h.job_for(press)


async def test_missing_job_ids_are_refused(h: Harness, errors: ErrorRecords) -> None:
    _job, message = await finish_grid(h, "real")
    for custom_id in ("mj:vary:AAAAAAAAAAAAAAAAAAAAAA:strong", "mj:zoom:AAAAAAAAAAAAAAAAAAAAAA:1.5"):
        press = await h.fake.press(custom_id, forged(message, custom_id))
        callback = await press.callback()
        assert callback.callback_type == 4 and callback.message_payload["flags"] & EPHEMERAL
        assert callback.message_payload["content"] == "This job no longer exists."
    assert not errors.records, errors.text()


async def corrupt_images(h: Harness, job: Job, *, keep_tiles: bool) -> None:
    """Overwrite the job's stored grid with bytes that are not an image.

    ``keep_tiles`` also gives the job four corrupt stored tiles at 1..4, the layout versions
    before on-demand tiles wrote, whose bytes the bot reuses as they are.
    """
    async with h.sessions() as session, session.begin():
        rows = (await session.scalars(select(Image).where(Image.job_id == job.id))).all()
        for row in rows:
            await h.store.put(row.key, CORRUPT, "image/png")
        await session.execute(delete(Image).where(Image.job_id == job.id, Image.index != 0))
        if keep_tiles:
            for index in range(1, 5):
                key = f"jobs/{job.id}/{index}.png"
                await h.store.put(key, CORRUPT, "image/png")
                session.add(Image(job_id=job.id, index=index, key=key, width=64, height=64))


@pytest.mark.parametrize("keep_tiles", [False, True], ids=["tile-cut-from-grid", "stored-tile"])
async def test_variation_of_a_corrupt_image_is_refunded_and_explained(
    h: Harness, errors: ErrorRecords, keep_tiles: bool
) -> None:
    job, message = await finish_grid(h, "fragile")
    await corrupt_images(h, job, keep_tiles=keep_tiles)
    used = await credits_used(h, h.fake.user.id)
    sent = len(h.dispatcher.sent)
    press = await h.fake.press(f"mj:v:{job.id}:1", message)
    assert (await press.callback()).callback_type == 5
    # The bot reads the input's header (a stored tile) or cuts it from the grid before sending
    # it to a worker, so unreadable bytes are refused here and never cost a generation.
    final = await press.wait_original(lambda m: "❌" in (m.get("content") or ""))
    assert "could not be used" in final["content"] and "refunded" in final["content"]
    variation = await h.wait_job((await h.job_for(press)).id, lambda j: j.status == JobStatus.FAILED)
    assert variation.error_code == ErrorCode.BAD_INPUT
    assert len(h.dispatcher.sent) == sent
    assert await credits_used(h, h.fake.user.id) == used
    assert not errors.records, errors.text()


async def test_crop_of_a_corrupt_grid_fails_cleanly(h: Harness, errors: ErrorRecords) -> None:
    job, message = await finish_grid(h, "fragile grid")
    await corrupt_images(h, job, keep_tiles=False)  # U# must cut the tile out of the grid itself
    used = await credits_used(h, h.fake.user.id)
    press = await h.fake.press(f"mj:u:{job.id}:2", message)
    await press.callback()
    final = await press.wait_original(lambda m: "❌" in (m.get("content") or ""))
    assert "could not be used" in final["content"]
    crop = await h.job_for(press)
    assert (await h.job(crop.id)).status == JobStatus.FAILED
    assert await credits_used(h, h.fake.user.id) == used  # crops are free, and nothing was taken
    assert not errors.records, errors.text()


async def test_crop_of_a_corrupt_stored_tile_fails_cleanly(h: Harness, errors: ErrorRecords) -> None:
    job, message = await finish_grid(h, "fragile tile")
    await corrupt_images(h, job, keep_tiles=True)  # U# reads the stored tile as it is
    press = await h.fake.press(f"mj:u:{job.id}:2", message)
    await press.callback()
    final = await press.wait_original(lambda m: "❌" in (m.get("content") or ""), timeout=3)
    assert "could not be used" in final["content"]
    crop = await h.job_for(press)
    assert (await h.job(crop.id)).status == JobStatus.FAILED
    assert not errors.records, errors.text()
