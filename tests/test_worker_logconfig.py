"""Worker logs with LOG_JSON: the bot's JSON fields, the job id, one line per record, no secrets."""

from __future__ import annotations

import io
import json
import logging

from pydantic import SecretStr

from workers.logconfig import JobFilter, JsonFormatter, Redactor, use_json_logging
from workers.settings import WorkerSettings


def _settings(**values: object) -> WorkerSettings:
    return WorkerSettings(_env_file=None, **values)  # type: ignore[arg-type]


def test_a_record_is_one_json_line_with_the_bots_fields_and_the_job_id() -> None:
    formatter = JsonFormatter()
    record = logging.LogRecord("workers.tasks", logging.INFO, __file__, 1, "job %s:\nline two", ("j1",), None)
    record.job_id = "job-123"
    text = formatter.format(record)
    assert "\n" not in text
    data = json.loads(text)
    assert data["level"] == "INFO" and data["logger"] == "workers.tasks"
    assert data["message"] == "job j1:\nline two"
    assert data["job_id"] == "job-123"
    assert set(data) == {"time", "level", "logger", "message", "job_id"}


def test_secrets_never_reach_the_log() -> None:
    settings = _settings(
        openai_api_key=SecretStr("sk-live-abcdefghijklmnop"),
        broker_url="redis://:broker-password-1@redis:6379/0",
    )
    formatter = JsonFormatter(Redactor.from_settings(settings, environ={}))
    record = logging.LogRecord(
        "x",
        logging.ERROR,
        __file__,
        1,
        "key %s via %s",
        ("sk-live-abcdefghijklmnop", settings.broker_url),
        None,
    )
    text = formatter.format(record)
    assert "sk-live-abcdefghijklmnop" not in text and "broker-password-1" not in text
    assert "[redacted]" in text


def test_use_json_logging_swaps_the_formatter_of_celerys_handlers() -> None:
    logger = logging.getLogger("mirage-test-json")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        use_json_logging(_settings(log_json=True), [logger])
        logger.warning("hello %s", "there", extra={"job_id": "job-9"})
    finally:
        logger.removeHandler(handler)
    data = json.loads(stream.getvalue())
    assert data["message"] == "hello there" and data["job_id"] == "job-9" and data["level"] == "WARNING"
    assert any(isinstance(f, JobFilter) for f in handler.filters)
