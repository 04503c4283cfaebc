"""Worker settings: the progress-report interval's rename and the result-encoding choice."""

from __future__ import annotations

import logging

import pytest

from workers.schema import ImageFormat
from workers.settings import WorkerSettings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PROGRESS_INTERVAL_S", "PROGRESS_REPORT_INTERVAL_S", "IMAGE_FORMAT", "IMAGE_COMPRESS_LEVEL"):
        monkeypatch.delenv(name, raising=False)


def test_progress_report_interval_is_read_under_its_name(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PROGRESS_REPORT_INTERVAL_S", "0.25")
    with caplog.at_level(logging.WARNING, logger="workers.settings"):
        settings = WorkerSettings(_env_file=None)  # type: ignore[call-arg]
    assert settings.progress_report_interval_s == 0.25
    assert "deprecated" not in caplog.text


def test_the_old_name_still_works_and_says_it_is_deprecated(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PROGRESS_INTERVAL_S", "0.75")
    with caplog.at_level(logging.WARNING, logger="workers.settings"):
        settings = WorkerSettings(_env_file=None)  # type: ignore[call-arg]
    assert settings.progress_report_interval_s == 0.75
    assert settings.progress_interval_s == 0.75  # the old attribute, for code not yet renamed
    assert "PROGRESS_INTERVAL_S is deprecated; use PROGRESS_REPORT_INTERVAL_S" in caplog.text


def test_the_new_name_wins_and_the_old_is_then_left_to_the_bot(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PROGRESS_INTERVAL_S", "0.75")  # the bot's edit interval, in a shared .env
    monkeypatch.setenv("PROGRESS_REPORT_INTERVAL_S", "0.25")
    with caplog.at_level(logging.WARNING, logger="workers.settings"):
        settings = WorkerSettings(_env_file=None)  # type: ignore[call-arg]
    assert settings.progress_report_interval_s == 0.25
    assert "deprecated" not in caplog.text


def test_result_encoding_defaults_and_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = WorkerSettings(_env_file=None)  # type: ignore[call-arg]
    assert (settings.image_format, settings.image_compress_level) == (ImageFormat.WEBP, None)
    monkeypatch.setenv("IMAGE_FORMAT", "png")
    monkeypatch.setenv("IMAGE_COMPRESS_LEVEL", "6")
    settings = WorkerSettings(_env_file=None)  # type: ignore[call-arg]
    assert (settings.image_format, settings.image_compress_level) == (ImageFormat.PNG, 6)


@pytest.mark.parametrize(("name", "value"), [("IMAGE_FORMAT", "jpeg"), ("IMAGE_COMPRESS_LEVEL", "10")])
def test_invalid_encoding_settings_are_refused(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError):
        WorkerSettings(_env_file=None)  # type: ignore[call-arg]
