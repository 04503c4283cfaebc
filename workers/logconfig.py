"""Worker logging with ``LOG_JSON``: one JSON object per line, in the bot's format, never secrets.

Workers must not import ``bot/`` (its logging module reads the bot's settings), so this is the
workers' own small version of ``bot.logconfig``; both write lines with ``workers.logformat``, so
the fields are the same: ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message``, ``job_id``
when the line belongs to a job, ``exc`` for a traceback, and any ``extra=`` keys. A log shipper
can read bot and worker lines alike.

Celery configures the worker's handlers itself (levels, its pool children's redirection); when
``LOG_JSON`` is on, :func:`use_json_logging` only swaps the formatter of every handler it made.
Plain text stays Celery's own format. Either way the job id comes from Celery's current task,
which is the job id (``task_id = job_id``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from workers import logformat
from workers.logformat import OPENAI_KEY, URL_PASSWORD, authorization_header
from workers.settings import WorkerSettings

SECRET_ENV_VARS = ("OPENAI_API_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN")


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


class Redactor(logformat.Redactor):
    """Replaces the worker's secret values and token-shaped patterns with ``[redacted]``."""

    patterns = (OPENAI_KEY, authorization_header("bearer"), URL_PASSWORD)

    @classmethod
    def from_settings(cls, settings: WorkerSettings, environ: dict[str, str] | None = None) -> Redactor:
        """The OpenAI key, the broker's and backends' URL passwords and secret env vars."""
        return cls.of(
            [settings.openai_api_key.get_secret_value()],
            urls=(settings.broker_url, settings.result_backend, settings.openai_rate_limit_storage or ""),
            env_vars=SECRET_ENV_VARS,
            environ=environ,
        )


class JsonFormatter(logformat.JsonFormatter):
    """``logformat.JsonFormatter``'s fields, as ``bot.logconfig`` writes them, the job id first; redacted."""

    # Celery's task formatter puts these on records; they are the job id under other names.
    record_attrs = logformat.RECORD_ATTRS | {"task_id", "task_name"}

    def __init__(self, redactor: Redactor | None = None) -> None:
        super().__init__()
        self.redactor = redactor or Redactor()

    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        """Time, level, logger, message and the job id (the record's, else the running task's)."""
        data = super().fields(record)
        job_id = getattr(record, "job_id", None) or current_job_id()
        if job_id:
            data["job_id"] = job_id
        return data

    def keep(self, key: str, value: Any) -> bool:
        """Every extra but ``job_id`` (written by :meth:`fields` when there is one)."""
        return key != "job_id"

    def format(self, record: logging.LogRecord) -> str:
        """The JSON line, redacted."""
        return self.redactor.redact(super().format(record))


def use_json_logging(settings: WorkerSettings, loggers: Iterable[logging.Logger] = ()) -> None:
    """Give every handler of the root logger (and ``loggers``) the JSON formatter and job filter."""
    formatter = JsonFormatter(Redactor.from_settings(settings))
    for logger in (logging.getLogger(), *loggers):
        for handler in logger.handlers:
            handler.setFormatter(formatter)
            if not any(isinstance(f, JobFilter) for f in handler.filters):
                handler.addFilter(JobFilter())
