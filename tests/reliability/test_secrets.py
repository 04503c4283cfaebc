"""Secrets never reach the log, Discord messages or admin output, where anyone reading them would get them.

A real discord.py client runs against the fake Discord with a distinctive bot token, an
``OPENAI_API_KEY`` and a broker password set, logging at DEBUG (discord.py's HTTP layer included,
which logs every webhook URL: those carry interaction tokens). It serves /imagine through to a
delivered grid, a broker outage (a logged traceback), /info and /status as an admin; afterwards no
secret may appear in the captured log, in anything the bot sent to Discord, or in /status.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tests.botutil as botutil
from bot.logconfig import setup_logging
from bot.models import JobStatus
from tests.botutil import FakeDispatcher, bot_harness, has_result

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(60)]

BOT_TOKEN = "MTEyMjMzNDQ1NTY2Nzc4ODk5.GsEcRt.DistinctiveBotTokenValue_0123456789"
OPENAI_KEY = "sk-proj-DistinctiveOpenAIKeyValue0123456789"
BROKER_PASSWORD = "DistinctiveBrokerPw42"
SECRETS = (BOT_TOKEN, OPENAI_KEY, BROKER_PASSWORD)


@pytest.fixture
def log_buffer(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """The bot's token and the OpenAI key set; the root logger's output captured after the test."""
    monkeypatch.setattr(botutil, "FAKE_TOKEN", BOT_TOKEN)  # the fake accepts it, the bot logs in with it
    monkeypatch.setenv("DISCORD_TOKEN", BOT_TOKEN)
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    loggers = {
        name: logging.getLogger(name).level
        for name in ("discord", "discord.http", "sqlalchemy.engine", "aiosqlite")
    }
    buffer = io.StringIO()
    try:
        yield buffer
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        for name, value in loggers.items():
            logging.getLogger(name).setLevel(value)


def install_logging(settings: Any, buffer: io.StringIO) -> None:
    """``setup_logging`` as the bot runs it, at DEBUG for everything, writing into ``buffer``."""
    setup_logging(settings)
    [handler] = logging.getLogger().handlers
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(buffer)
    # setup_logging keeps discord.http at INFO; open it up: it is where webhook URLs are logged.
    logging.getLogger("discord").setLevel(logging.DEBUG)
    logging.getLogger("discord.http").setLevel(logging.DEBUG)


def sent_to_discord(fake: Any) -> str:
    """Every body, uploaded file and response the fake recorded (not the auth headers: the
    token is supposed to be there)."""
    parts: list[str] = []
    for request in fake.requests:
        parts.append(json.dumps(request.json, default=str))
        parts.append(json.dumps(request.response, default=str))
        parts.extend(f.data.decode("latin-1") for f in request.files)
        parts.append(request.path + json.dumps(request.query))
    return "\n".join(parts)


@pytest.mark.parametrize("log_json", [False, True], ids=["plain", "json"])
async def test_no_secret_in_logs_messages_or_status(
    tmp_path: Path, sqlite_url: str, log_buffer: io.StringIO, log_json: bool
) -> None:
    dispatcher = FakeDispatcher(fail_sends=1)  # the first send fails: a logged traceback
    async with bot_harness(
        tmp_path,
        sqlite_url,
        dispatcher,
        start=False,
        log_level="DEBUG",
        log_json=log_json,
        broker_url=f"redis://:{BROKER_PASSWORD}@127.0.0.1:6379/0",
        result_backend=f"redis://:{BROKER_PASSWORD}@127.0.0.1:6379/1",
    ) as h:
        assert h.settings.discord_token.get_secret_value() == BOT_TOKEN
        install_logging(h.settings, log_buffer)
        h.settings.admin_user_ids = [h.fake.user.id]
        await h.start_bot()

        inter = await h.imagine(f"a fox holding a sign that says {BOT_TOKEN[:6]}")
        job = await h.job_for(inter)
        await h.wait_job(job.id, lambda j: j.status == JobStatus.QUEUED, timeout=10)
        dispatcher.succeed(job.id)
        h.bot.tracker.wake()
        await inter.wait_original(has_result)

        info = await h.fake.slash("info")
        await h.fake.wait_for_request(
            lambda r: r.interaction_token == info.token and r.route == "webhook_execute"
        )
        status = await h.fake.slash("status")
        reply = await h.fake.wait_for_request(
            lambda r: r.interaction_token == status.token and r.route == "webhook_execute"
        )
        status_text = json.dumps(reply.message_payload)
        assert "Workers online" in status_text
        discord_text = sent_to_discord(h.fake)
        interaction_tokens = [i.token for i in (inter, info, status)]
        await h.stop_bot()

    log_text = log_buffer.getvalue()
    # The capture saw the paths that matter, so a clean result means something.
    assert "broker down (fake)" in log_text and "Traceback" in log_text
    assert f"accepted job {job.id}" in log_text
    assert "/webhooks/" in log_text and "[redacted]" in log_text  # discord.http DEBUG URLs
    for secret in SECRETS:
        assert secret not in log_text, f"{secret} in the log"
        assert secret not in discord_text, f"{secret} sent to Discord"
        assert secret not in status_text, f"{secret} in /status"
    for token in interaction_tokens:  # interaction tokens are credentials too (15 min)
        assert token not in log_text
    if log_json:
        records = [json.loads(line) for line in log_text.splitlines()]
        assert any(r.get("job_id") == job.id and r.get("member_id") for r in records)
    else:
        assert f"[job={job.id} member=" in log_text
