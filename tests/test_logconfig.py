"""The bot's log output: one line per event, job context on every line, no secrets.

Each test formats through the handler :func:`bot.logconfig.make_handler` builds (the one
``setup_logging`` installs on the root logger) into a ``StringIO``.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from bot.logconfig import job_context, job_end_fields, log_job_end, make_handler, setup_logging
from bot.models import Job
from bot.settings import BotSettings

DISCORD_TOKEN = "MTIzNDU2Nzg5MDEyMzQ1Njc4.GhIjKl.distinctive-discord-token-value"
OPENAI_KEY = "sk-proj-distinctiveOpenAIkey1234567890"
S3_ACCESS = "AKIADISTINCTIVEACCESS"
S3_SECRET = "distinctive/s3+secret=key"
DB_PASSWORD = "db-pass-w0rd!"
BROKER_PASSWORD = "broker-pass-123"


def settings(tmp: Path, **overrides: Any) -> BotSettings:
    """Settings carrying one distinctive value of every secret kind."""
    values: dict[str, Any] = {
        "discord_token": DISCORD_TOKEN,
        "s3_access_key": S3_ACCESS,
        "s3_secret_key": S3_SECRET,
        "database_url": f"postgresql+psycopg://mirage:{DB_PASSWORD.replace('!', '%21')}@db:5432/mirage",
        "broker_url": f"redis://:{BROKER_PASSWORD}@redis:6379/0",
        "result_backend": f"redis://:{BROKER_PASSWORD}@redis:6379/1",
        "media_dir": tmp / "media",
    }
    values.update(overrides)
    return BotSettings(_env_file=None, **values)  # type: ignore[call-arg]


class Capture:
    """A logger whose only handler is the project's, writing into a buffer."""

    def __init__(self, config: BotSettings) -> None:
        self.buffer = io.StringIO()
        self.handler = make_handler(config, self.buffer)
        self.log = logging.getLogger(f"test.logconfig.{id(self)}")
        self.log.handlers[:] = [self.handler]
        self.log.propagate = False
        self.log.setLevel(logging.DEBUG)

    @property
    def text(self) -> str:
        """Everything written so far."""
        return self.buffer.getvalue()

    def lines(self) -> list[str]:
        """Written lines (the output ends with a newline per record)."""
        return self.text.splitlines()


@pytest.fixture
def env_key(monkeypatch: pytest.MonkeyPatch) -> str:
    """``OPENAI_API_KEY`` set in the environment the formatter is built in."""
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    return OPENAI_KEY


@pytest.fixture
def plain(tmp_path: Path, env_key: str) -> Capture:
    """Plain-text output."""
    return Capture(settings(tmp_path))


@pytest.fixture
def as_json(tmp_path: Path, env_key: str) -> Capture:
    """JSON output."""
    return Capture(settings(tmp_path, log_json=True))


ALL_SECRETS = [DISCORD_TOKEN, OPENAI_KEY, S3_ACCESS, S3_SECRET, DB_PASSWORD, BROKER_PASSWORD]


def assert_clean(text: str) -> None:
    """No secret value appears, nor its URL-encoded form."""
    for secret in [*ALL_SECRETS, DB_PASSWORD.replace("!", "%21")]:
        assert secret not in text, secret


# --- structure -------------------------------------------------------------------------------------


def test_json_mode_is_one_object_per_line_with_context_and_extras(as_json: Capture) -> None:
    with job_context("job-abc", 42):
        as_json.log.info("accepted %s", "a prompt\nwith a newline", extra={"engine": "sdxl"})
        try:
            raise RuntimeError("boom\nsecond line")
        except RuntimeError:
            as_json.log.exception("failed")
    as_json.log.info("outside")
    records = [json.loads(line) for line in as_json.lines()]
    assert len(records) == 3
    first, second, third = records
    assert first["message"] == "accepted a prompt\nwith a newline"
    assert first["job_id"] == "job-abc" and first["member_id"] == 42 and first["engine"] == "sdxl"
    assert first["level"] == "INFO" and first["logger"] == as_json.log.name
    assert second["job_id"] == "job-abc" and "RuntimeError: boom\nsecond line" in second["exc"]
    assert "job_id" not in third and "member_id" not in third


def test_extra_wins_over_context(as_json: Capture) -> None:
    with job_context("outer", 1):
        as_json.log.info("x", extra={"job_id": "explicit"})
    [record] = [json.loads(line) for line in as_json.lines()]
    assert record["job_id"] == "explicit" and record["member_id"] == 1


def test_nested_context_keeps_the_member_and_resets(plain: Capture) -> None:
    with job_context("j1", 7):
        with job_context("j2"):
            plain.log.info("inner")
        plain.log.info("outer")
    plain.log.info("none")
    inner, outer, none = plain.lines()
    assert inner.endswith("inner [job=j2 member=7]")
    assert outer.endswith("outer [job=j1 member=7]")
    assert none.endswith("none")


async def test_context_follows_tasks_not_neighbours(as_json: Capture) -> None:
    async def work(job: str) -> None:
        with job_context(job):
            await asyncio.sleep(0.01)
            as_json.log.info("done %s", job)

    await asyncio.gather(*(work(f"job{i}") for i in range(5)))
    for line in as_json.lines():
        record = json.loads(line)
        assert record["message"] == f"done {record['job_id']}"


def test_plain_mode_escapes_newlines_so_lines_cannot_be_forged(plain: Capture) -> None:
    hostile = "a cat\n2026-01-01 00:00:00,000 ERROR   bot: forged\r\nmore\u2028end"
    with job_context("j", 3):
        plain.log.warning("prompt %s", hostile)
        try:
            raise ValueError(hostile)
        except ValueError:
            plain.log.exception("handling failed")
    lines = plain.lines()
    assert len(lines) == 2
    assert "a cat\\n2026-01-01 00:00:00,000 ERROR   bot: forged\\r\\nmore\\u2028end" in lines[0]
    assert lines[0].endswith("[job=j member=3]")
    # The traceback is on the same line, after the context, escaped.
    assert "handling failed [job=j member=3]\\nTraceback (most recent call last):\\n" in lines[1]
    assert "ValueError: a cat\\n" in lines[1]


# --- redaction ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["plain", "as_json"])
def test_each_secret_value_is_redacted(mode: str, request: pytest.FixtureRequest) -> None:
    capture: Capture = request.getfixturevalue(mode)
    for secret in ALL_SECRETS:
        capture.log.info("value=%s!", secret)
    capture.log.info("url %s", f"postgresql://mirage:{DB_PASSWORD}@db/mirage")
    capture.log.info("encoded %s", "postgresql://mirage:db-pass-w0rd%21@db/mirage")
    capture.log.info("repr %r", {"token": DISCORD_TOKEN, "s3": S3_SECRET})
    assert_clean(capture.text)
    assert capture.text.count("[redacted]") >= len(ALL_SECRETS) + 3


def test_secrets_inside_a_traceback_are_redacted(plain: Capture, as_json: Capture) -> None:
    def connect() -> None:
        token = DISCORD_TOKEN  # a local in the failing frame, as in a real crash
        raise ConnectionError(f"login failed for {token} with key {OPENAI_KEY} and {S3_SECRET}")

    for capture in (plain, as_json):
        try:
            connect()
        except ConnectionError:
            capture.log.exception("startup failed, url redis://:%s@redis/0", BROKER_PASSWORD)
        assert "ConnectionError: login failed for [redacted]" in capture.text
        assert_clean(capture.text)


def test_the_signing_key_and_the_metrics_token_are_redacted(tmp_path: Path) -> None:
    """WEB_SECRET signs private links and METRICS_TOKEN guards /metrics: secrets like the token."""
    signing_key, metrics_token = "distinctive-web-signing-key", "distinctive-metrics-token"
    capture = Capture(settings(tmp_path, web_secret=signing_key, metrics_token=metrics_token))
    capture.log.info("signing with %s", signing_key)
    capture.log.warning("scrape refused: %r", {"expected": metrics_token})
    assert signing_key not in capture.text and metrics_token not in capture.text
    assert capture.text.count("[redacted]") == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "POST https://discord.com/api/v10/webhooks/123456789/aW50ZXJhY3Rpb246MTIz.ab_c-d/messages/@original",
            "webhooks/123456789/[redacted]/messages/@original",
        ),
        (
            "POST https://discord.com/api/v10/interactions/987654321/aW50ZXJhY3Rpb24tdG9rZW4/callback",
            "interactions/987654321/[redacted]/callback",
        ),
        ("headers {'Authorization': 'Bot some.other-token'}", "'Authorization': 'Bot [redacted]'"),
        (
            "Bot OTk5OTk5OTk5OTk5OTk5OTk5.GaBcDe.abcdefghijklmnopqrstuvwxyz012 rejected",
            "Bot [redacted] rejected",
        ),
        ("key sk-abcdefghij0123456789XYZ used", "key sk-[redacted] used"),
        ("amqp://guest:hunter2hunter2@rabbit:5672//", "amqp://guest:[redacted]@rabbit:5672//"),
        ("{'token': 'aW50ZXJhY3Rpb246abc', 'version': 1}", "{'token': '[redacted]', 'version': 1}"),
        ("interaction_token=aW50ZXJhY3Rpb246abc ok", "interaction_token=[redacted] ok"),
    ],
)
def test_token_patterns_are_redacted(plain: Capture, text: str, expected: str) -> None:
    plain.log.debug("%s", text)
    assert expected in plain.text


def test_innocent_text_is_left_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "short")  # below the minimum length: never redacted
    capture = Capture(settings(tmp_path, s3_access_key="abc"))
    message = "Bot connected as mirage; short abc; sk-short; webhooks are fine; http://host:8080/x"
    capture.log.info(message)
    assert message in capture.text and "[redacted]" not in capture.text


def test_setup_logging_redacts_library_loggers(
    tmp_path: Path, env_key: str, restore_root_logger: None, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging(settings(tmp_path, log_level="DEBUG"))
    http = logging.getLogger("discord.http")
    assert http.getEffectiveLevel() == logging.INFO  # quiet unless asked
    # SQL parameter logs (prompts, interaction tokens in bare tuples) stay off even at DEBUG.
    assert logging.getLogger("sqlalchemy.engine").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("aiosqlite").getEffectiveLevel() == logging.INFO
    http.setLevel(logging.DEBUG)
    http.debug(
        "POST %s with %s has returned 204",
        "https://discord.com/api/v10/webhooks/1/aW50ZXJhY3Rpb246token-value",
        {"Authorization": f"Bot {DISCORD_TOKEN}"},
    )
    err = capsys.readouterr().err
    assert "webhooks/1/[redacted]" in err and "discord.http" in err
    assert_clean(err)
    assert "token-value" not in err


def ended_job(**values: Any) -> Job:
    """A final job accepted at 12:00:00, started 2.5 s later and finished 4 s after that."""
    accepted = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    fields: dict[str, Any] = {
        "id": "J" * 22,
        "member_id": 7,
        "kind": "imagine",
        "engine": "sdxl",
        "status": "done",
        "cost": 2,
        "created_at": accepted,
        "started_at": accepted + timedelta(seconds=2.5),
        "finished_at": accepted + timedelta(seconds=6.5),
    }
    fields.update(values)
    return Job(**fields)


def test_a_done_job_logs_its_end_with_wait_and_run_durations(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("bot.test_job_end")
    with caplog.at_level(logging.INFO, logger="bot.test_job_end"):
        log_job_end(logger, ended_job())
    [record] = caplog.records
    assert record.levelno == logging.INFO
    assert record.getMessage() == f"job {'J' * 22} done (imagine, sdxl): waited 2.50s, ran 4.00s"
    assert record.end_refunded == 0 and record.end_wait_s == 2.5  # type: ignore[attr-defined]


def test_a_failed_job_logs_the_refund_and_the_workers_text() -> None:
    never_started = ended_job(
        status="failed", started_at=None, error_code="engine_error", error="CUDA out of memory"
    )
    fields = job_end_fields(never_started)
    assert fields["outcome"] == "failed" and fields["refunded"] == 2
    assert fields["wait_s"] == 6.5 and fields["run_s"] is None
    assert fields["error"] == "CUDA out of memory"
