"""``workers.schema.JobFailed``: the exception a failed job's task ends with, readable by the bot."""

from __future__ import annotations

import json

from celery import Celery

from workers.schema import ErrorCode, JobFailed


def _backend_app() -> Celery:
    app = Celery("job-failed-test", backend="cache+memory://", set_as_current=False)
    app.conf.update(result_serializer="json", accept_content=["json"], result_accept_content=["json"])
    return app


def test_it_crosses_celerys_json_result_serialiser_intact() -> None:
    app = _backend_app()
    stored = app.backend.prepare_exception(JobFailed("content_policy", "The prompt was refused."))
    assert json.loads(json.dumps(stored)) == {
        "exc_type": "JobFailed",
        "exc_message": ["content_policy", "The prompt was refused."],
        "exc_module": "workers.schema",
    }
    rebuilt = app.backend.exception_to_python(json.loads(json.dumps(stored)))
    failed = JobFailed.from_exception(rebuilt)
    assert failed is not None
    assert (failed.error_code, failed.message) == (ErrorCode.CONTENT_POLICY, "The prompt was refused.")
    app.close()


def test_a_stand_in_of_the_same_name_is_read_too() -> None:
    """Where Celery rebuilt it as its own stand-in class (schema module not imported)."""
    stand_in = type("JobFailed", (Exception,), {})("timeout", "Too slow.")
    failed = JobFailed.from_exception(stand_in)
    assert failed is not None and failed.error_code is ErrorCode.TIMEOUT and failed.message == "Too slow."


def test_other_exceptions_and_unknown_codes() -> None:
    assert JobFailed.from_exception(RuntimeError("boom")) is None
    assert JobFailed.from_exception("JobFailed") is None
    assert JobFailed("from_a_newer_worker", "x").error_code is ErrorCode.ENGINE_ERROR
