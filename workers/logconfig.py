"""Worker logging with ``LOG_JSON``: one JSON object per line, in the bot's format, never secrets.

Workers must not import ``bot/`` (its logging module reads the bot's settings), so this is the
workers' own small version of ``bot.logconfig``, writing the same fields: ``time`` (ISO 8601,
UTC), ``level``, ``logger``, ``message``, ``job_id`` when the line belongs to a job, ``exc`` for a
traceback, and any ``extra=`` keys. A log shipper can read bot and worker lines alike.

Celery configures the worker's handlers itself (levels, its pool children's redirection); when
``LOG_JSON`` is on, :func:`use_json_logging` only swaps the formatter of every handler it made.
Plain text stays Celery's own format. Either way the job id comes from Celery's current task,
which is the job id (``task_id = job_id``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit

from workers.settings import WorkerSettings

REDACTED = "[redacted]"
MIN_SECRET_LENGTH = 8  # shorter values would redact innocent text all over the log
SECRET_ENV_VARS = ("OPENAI_API_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN")

_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    # Celery's task formatter puts these on records; they are the job id under other names.
    "task_id",
    "task_name",
}
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\bsk-[A-Za-z0-9_\-]{10,}"), "sk-" + REDACTED),  # OpenAI keys
    (re.compile(r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?)(bearer)\s+[^\s\"',}]+"), r"\1\2 " + REDACTED),
    (re.compile(r"([a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]*):[^@\s/]+@"), r"\1:" + REDACTED + "@"),  # user:pw@
)


def current_job_id() -> str | None:
    """The id of the Celery task this thread is running (the job id), or None."""
    from celery import current_task

    try:
        task = current_task._get_current_object()
    except Exception:  # no app or task machinery in this process
        return None
    request = getattr(task, "request", None) if task is not None else None
    job_id = getattr(request, "id", None)
    return str(job_id) if job_id else None


class JobFilter(logging.Filter):
    """Puts the running job's id on each record as ``job_id``, unless ``extra=`` already did."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Annotate the record; never drops it."""
        if getattr(record, "job_id", None) is None:
            record.job_id = current_job_id()
        return True


class Redactor:
    """Replaces the worker's secret values and token-shaped patterns with ``[redacted]``."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        values: set[str] = set()
        for secret in secrets:
            if secret and len(secret) >= MIN_SECRET_LENGTH:
                values.update({secret, json.dumps(secret)[1:-1], repr(secret)[1:-1]})
        ordered = sorted(values, key=len, reverse=True)  # a secret containing another goes whole
        self._values = re.compile("|".join(re.escape(v) for v in ordered)) if ordered else None

    @classmethod
    def from_settings(cls, settings: WorkerSettings, environ: dict[str, str] | None = None) -> Redactor:
        """The OpenAI key, the broker's and backends' URL passwords and secret env vars."""
        env = os.environ if environ is None else environ
        secrets = [
            settings.openai_api_key.get_secret_value(),
            *(env.get(name, "") for name in SECRET_ENV_VARS),
        ]
        for url in (settings.broker_url, settings.result_backend, settings.openai_rate_limit_storage or ""):
            try:
                password = urlsplit(url).password
            except ValueError:
                password = None
            if password:
                secrets += [password, unquote(password)]
        return cls(secrets)

    def redact(self, text: str) -> str:
        """``text`` with every secret value and pattern replaced."""
        if self._values is not None:
            text = self._values.sub(REDACTED, text)
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
        return text


class JsonFormatter(logging.Formatter):
    """One JSON object per record, the fields ``bot.logconfig.JsonFormatter`` writes; redacted."""

    def __init__(self, redactor: Redactor | None = None) -> None:
        super().__init__()
        self.redactor = redactor or Redactor()

    def format(self, record: logging.LogRecord) -> str:
        """Serialise the record: time, level, logger, message, job id, ``extra=`` keys, traceback."""
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        job_id = getattr(record, "job_id", None) or current_job_id()
        if job_id:
            data["job_id"] = job_id
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and key not in data and not key.startswith("_") and key != "job_id":
                data[key] = value
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            data["stack"] = self.formatStack(record.stack_info)
        # json.dumps escapes newlines inside strings, so one record is always one line.
        return self.redactor.redact(json.dumps(data, ensure_ascii=False, default=str))


def use_json_logging(settings: WorkerSettings, loggers: Iterable[logging.Logger] = ()) -> None:
    """Give every handler of the root logger (and ``loggers``) the JSON formatter and job filter."""
    formatter = JsonFormatter(Redactor.from_settings(settings))
    for logger in (logging.getLogger(), *loggers):
        for handler in logger.handlers:
            handler.setFormatter(formatter)
            if not any(isinstance(f, JobFilter) for f in handler.filters):
                handler.addFilter(JobFilter())
