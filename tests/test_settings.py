"""Settings: environment parsing, driver selection, secrets that never print, no torch in the bot."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bot.settings import BotSettings
from workers.settings import WorkerSettings


def test_env_lists_and_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Admin ids parse from "1,2"; the token is a SecretStr that repr/str/json never reveal."""
    monkeypatch.setenv("ADMIN_USER_IDS", "11, 22")
    monkeypatch.setenv("DISCORD_TOKEN", "super-secret-token-value")
    settings = BotSettings(_env_file=None)
    assert settings.admin_user_ids == [11, 22]
    assert settings.discord_token.get_secret_value() == "super-secret-token-value"
    for text in (repr(settings), str(settings), settings.model_dump_json()):
        assert "super-secret-token-value" not in text


def test_worker_secret_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    """The OpenAI key is a SecretStr too."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-should-never-print")
    settings = WorkerSettings(_env_file=None)
    assert "sk-should-never-print" not in repr(settings) + settings.model_dump_json()


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgres://u@h/db", "postgresql+psycopg://u@h/db"),
        ("sqlite:///./x.db", "sqlite+aiosqlite:///./x.db"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
    ],
)
def test_database_url_driver(given: str, expected: str) -> None:
    """Plain URLs get the async drivers the bot needs."""
    assert BotSettings(_env_file=None, database_url=given).database_url == expected


def test_embedded_defaults_need_no_server() -> None:
    """Out of the box: SQLite database, a server-less broker and result backend."""
    settings = BotSettings(_env_file=None)
    assert settings.database_url.startswith("sqlite+aiosqlite://")
    assert not settings.broker_url.startswith(("redis://", "amqp://"))
    assert WorkerSettings(_env_file=None).broker_url == settings.broker_url


def test_bot_and_schema_do_not_import_torch() -> None:
    """The bot image ships without torch: importing the bot side must not pull it in."""
    code = (
        "import sys, bot.__main__, bot.client, bot.delivery, bot.jobs, bot.dispatch, bot.buttons,"
        " bot.cogs.imagine, bot.cogs.account, bot.cogs.admin, bot.web.app, bot.metrics, bot.storage,"
        " workers.schema, workers.imaging;"
        "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bot_progress_edit_interval_reads_the_old_name_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """PROGRESS_INTERVAL_S meant two things; on the bot it is now PROGRESS_EDIT_INTERVAL_S."""
    monkeypatch.setenv("PROGRESS_INTERVAL_S", "3.5")
    with caplog.at_level("WARNING", logger="bot.settings"):
        assert BotSettings(_env_file=None).progress_edit_interval_s == 3.5
    assert "PROGRESS_INTERVAL_S is deprecated; use PROGRESS_EDIT_INTERVAL_S" in caplog.text
    monkeypatch.setenv("PROGRESS_EDIT_INTERVAL_S", "1.0")
    assert BotSettings(_env_file=None).progress_edit_interval_s == 1.0  # the new name wins
