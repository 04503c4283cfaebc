"""Logging for the bot process: plain text or one JSON object per line, never secrets.

Settings are never logged wholesale; secrets are ``SecretStr`` and print as ``**********``. On top
of that, every handler :func:`setup_logging` installs:

- carries the current job's context (``job_id``, ``member_id``) from :func:`job_context`, so the
  lines of one job can be grepped out of a busy log;
- writes exactly one line per event: in plain mode newlines in the message and in tracebacks are
  escaped (a prompt like ``"cat\\nERROR forged line"`` cannot fake a log line), in JSON mode the
  traceback is a field;
- redacts the final text (tracebacks included): the configured secret values (Discord token, S3
  keys, ``WEB_SECRET``, ``METRICS_TOKEN``, ``OPENAI_API_KEY``), passwords in the database/broker
  URLs, and token-shaped patterns that libraries log on their own (discord.py's DEBUG webhook and
  interaction URLs, ``Bot`` auth headers, OpenAI ``sk-`` keys).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from typing import IO, TYPE_CHECKING, Any

from bot.settings import BotSettings
from workers import logformat
from workers.logformat import OPENAI_KEY, REDACTED, URL_PASSWORD, Pattern, authorization_header

if TYPE_CHECKING:
    from bot.models import Job

# Environment variables holding secrets the settings class does not own (the OpenAI key is read
# by the worker/SDK, but a misconfigured bot may still see and log it).
SECRET_ENV_VARS = ("OPENAI_API_KEY", "DISCORD_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")

# Loggers that write SQL parameters (prompts, stored interaction tokens) below this level: they
# stay at it whatever the bot's level, since no pattern can tell a token in a bare tuple.
QUIET_LOGGERS = {"sqlalchemy.engine": logging.WARNING, "aiosqlite": logging.INFO}

job_id_var: ContextVar[str | None] = ContextVar("mirage_job_id", default=None)
member_id_var: ContextVar[int | str | None] = ContextVar("mirage_member_id", default=None)

_CONTEXT_KEYS = ("job_id", "member_id")

# Characters that log viewers treat as line breaks, with the escape written in their place.
_LINE_BREAKS = {"\r": "\\r", "\n": "\\n", "\x85": "\\x85", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_LINE_BREAK_RE = re.compile("[" + "".join(_LINE_BREAKS) + "]")

# Token-shaped text that libraries log by themselves (order matters: specific before generic).
_PATTERNS: tuple[Pattern, ...] = (
    # Webhook and interaction-followup URLs: the path segment after the id is a credential.
    (re.compile(r"(webhooks/\d+/)[A-Za-z0-9_.\-]+"), r"\1" + REDACTED),
    (re.compile(r"(interactions/\d+/)[A-Za-z0-9_.\-]+(/callback)"), r"\1" + REDACTED + r"\2"),
    # An Authorization header, whatever its value looks like.
    authorization_header("bot", "bearer"),
    # A Discord bot token (three dot-separated base64 parts) after "Bot ".
    (re.compile(r"\bBot\s+[A-Za-z0-9_\-]{10,}\.[A-Za-z0-9_\-]{4,}\.[A-Za-z0-9_\-]{10,}"), "Bot " + REDACTED),
    # A token-named field in a logged payload (discord.py's DEBUG gateway events carry each
    # interaction's token; an IDENTIFY carries the bot's): "token": "…", interaction_token=….
    (
        re.compile(r"""(?i)(\b\w*token["']?\s*[:=]\s*["']?)[A-Za-z0-9_.\-]{8,}"""),
        r"\1" + REDACTED,
    ),
    OPENAI_KEY,  # sk-…, sk-proj-…
    URL_PASSWORD,  # user:password@ in any URL
)


# --- job context ------------------------------------------------------------------------------


@contextmanager
def job_context(job_id: str | None = None, member_id: int | str | None = None) -> Iterator[None]:
    """Tag every log record emitted inside the block (and tasks created in it) with the job.

    ``None`` leaves the outer value in place, so a nested ``job_context(job_id)`` keeps the member.
    Context variables are per task: ``asyncio.create_task`` copies the current values, so a task
    spawned inside the block inherits them and concurrent jobs never see each other's ids.
    """
    job_token = job_id_var.set(job_id) if job_id is not None else None
    member_token = member_id_var.set(member_id) if member_id is not None else None
    try:
        yield
    finally:
        if member_token is not None:
            member_id_var.reset(member_token)
        if job_token is not None:
            job_id_var.reset(job_token)


class ContextFilter(logging.Filter):
    """Puts the current ``job_id``/``member_id`` on each record, unless ``extra=`` already did."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Annotate the record; never drops it."""
        if getattr(record, "job_id", None) is None:
            record.job_id = job_id_var.get()
        if getattr(record, "member_id", None) is None:
            record.member_id = member_id_var.get()
        return True


# --- redaction --------------------------------------------------------------------------------


class Redactor(logformat.Redactor):
    """Replaces the bot's secret values and token-shaped patterns in text with ``[redacted]``."""

    patterns = _PATTERNS

    @classmethod
    def from_settings(cls, settings: BotSettings, environ: dict[str, str] | None = None) -> Redactor:
        """The secrets of this process: settings' ``SecretStr`` s, URL passwords, secret env vars."""
        return cls.of(
            [
                settings.discord_token.get_secret_value(),
                settings.s3_access_key.get_secret_value(),
                settings.s3_secret_key.get_secret_value(),
                settings.web_secret.get_secret_value(),
                settings.metrics_token.get_secret_value(),
            ],
            urls=(settings.database_url, settings.broker_url, settings.result_backend),
            env_vars=SECRET_ENV_VARS,
            environ=environ,
        )


# --- formatters -------------------------------------------------------------------------------


def _context_suffix(record: logging.LogRecord) -> str:
    parts = [f"{key.split('_')[0]}={value}" for key in _CONTEXT_KEYS if (value := getattr(record, key, None))]
    return f" [{' '.join(parts)}]" if parts else ""


def escape_line_breaks(text: str) -> str:
    """``text`` on one line: CR, LF and Unicode line separators written as escapes."""
    return _LINE_BREAK_RE.sub(lambda m: _LINE_BREAKS[m.group()], text)


class PlainFormatter(logging.Formatter):
    """``time level logger: message [job=… member=…]``, always a single line."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The message line plus the job context (before any traceback)."""
        return super().formatMessage(record) + _context_suffix(record)

    def format(self, record: logging.LogRecord) -> str:
        """The formatted record with tracebacks and hostile newlines escaped onto one line."""
        return escape_line_breaks(super().format(record))


class JsonFormatter(logformat.JsonFormatter):
    """One JSON object per record, for log shippers; the job context when there is one."""

    def keep(self, key: str, value: Any) -> bool:
        """Every extra but an unset ``job_id``/``member_id``."""
        return value is not None or key not in _CONTEXT_KEYS


class RedactingFormatter(logging.Formatter):
    """Wraps another formatter and redacts its final text (message, extras and traceback)."""

    def __init__(self, inner: logging.Formatter, redactor: Redactor) -> None:
        super().__init__()
        self.inner = inner
        self.redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        """The inner formatter's output, redacted."""
        return self.redactor.redact(self.inner.format(record))


def make_handler(settings: BotSettings, stream: IO[str] | None = None) -> logging.Handler:
    """A stream handler with the project's formatter, context filter and redaction."""
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    inner: logging.Formatter = JsonFormatter() if settings.log_json else PlainFormatter()
    handler.setFormatter(RedactingFormatter(inner, Redactor.from_settings(settings)))
    handler.addFilter(ContextFilter())
    return handler


def setup_logging(settings: BotSettings) -> None:
    """Configure the root logger once for the bot process."""
    handler = make_handler(settings)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    # discord.py's HTTP layer logs every request at DEBUG; keep it at INFO unless asked.
    logging.getLogger("discord.http").setLevel(max(logging.INFO, root.level))
    for name, floor in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(max(floor, root.level))


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    return (end - start).total_seconds() if start is not None and end is not None else None


def job_end_fields(job: Job) -> dict[str, Any]:
    """How a final job ended, as log fields: outcome, refund, queue wait and run durations.

    ``wait_s`` runs from acceptance to a worker starting it (fairness hold and broker queue
    together), ``run_s`` from that start to its end; a job that failed before starting has only
    a wait. ``error`` is the worker's own text, which members never see.
    """
    refunded = job.cost if job.status != "done" else 0
    start = job.started_at
    fields: dict[str, Any] = {
        "job_id": job.id,
        "outcome": job.status,
        "kind": job.kind,
        "engine": job.engine,
        "wait_s": _seconds(job.created_at, start or job.finished_at),
        "run_s": _seconds(start, job.finished_at),
        "generation_s": job.generation_s,
        "refunded": refunded,
    }
    if job.status != "done":
        fields["error_code"] = job.error_code
        fields["error"] = job.error
    return fields


def log_job_end(logger: logging.Logger, job: Job) -> None:
    """One INFO line when a job ends (done, failed or cancelled), with its id and durations."""
    fields = job_end_fields(job)

    def shown(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}s"

    text = (
        f"job {job.id} {fields['outcome']} ({job.kind}, {job.engine}): "
        f"waited {shown(fields['wait_s'])}, ran {shown(fields['run_s'])}"
    )
    if job.status != "done":
        text += f", {fields['refunded']} credit(s) refunded, {job.error_code}: {job.error or ''}"
    extra = {f"end_{key}": value for key, value in fields.items() if key != "job_id"}
    with job_context(job.id, job.member_id):
        logger.info("%s", text, extra=extra)
