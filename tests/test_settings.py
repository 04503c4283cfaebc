"""Settings: environment parsing, driver selection, secrets that never print, no torch in the bot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import bot.__main__ as bot_main
from bot.settings import BotSettings
from tests.conftest import main_exit_code
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


@pytest.mark.parametrize(
    ("name", "value", "explained"),
    [
        ("ALLOWED_GUILD_IDS", "123,abc", "comma-separated"),
        ("DISCORD_GUILD_IDS", "[123, 456", "JSON list"),
        ("ADMIN_USER_IDS", "11;22", "comma-separated"),
        ("CREDIT_PERIOD", "fortnight", "'day', 'week' or 'month'"),
        ("LOG_LEVEL", "verbose", "DEBUG, INFO, WARNING, ERROR"),
        ("WEB_PORT", "80800", "less than or equal to 65535"),
        ("METRICS_PORT", "8080", "must differ from WEB_PORT"),
    ],
)
def test_a_bad_setting_stops_main_with_its_name_and_what_it_takes(
    name: str,
    value: str,
    explained: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    restore_root_logger: None,
) -> None:
    """No traceback: one message naming the variable and its allowed values, never a secret."""

    async def never(settings: BotSettings) -> None:
        raise AssertionError("main ran the bot on invalid settings")

    monkeypatch.chdir(tmp_path)  # no stray .env
    monkeypatch.setattr(bot_main, "run", never)
    monkeypatch.setenv("DISCORD_TOKEN", "distinctive-token-value.abc.def")
    monkeypatch.setenv("DATABASE_URL", "postgresql://mirage:distinctive-db-password@db/mirage")
    monkeypatch.setenv(name, value)
    message = main_exit_code()
    assert isinstance(message, str)  # printed by Python, exit status 1
    assert name in message and explained in message
    assert "distinctive-token-value" not in message and "distinctive-db-password" not in message


def test_repr_masks_the_passwords_in_the_database_and_broker_urls() -> None:
    """The URLs stay plain strings for SQLAlchemy and Celery, but their passwords never print."""
    settings = BotSettings(
        _env_file=None,
        database_url="postgresql://mirage:db-secret-pw@db:5432/mirage",
        broker_url="amqp://mirage:broker-secret-pw@rabbit:5672//",
        result_backend="redis://:backend-secret-pw@redis:6379/1",
    )
    for text in (repr(settings), str(settings)):
        for secret in ("db-secret-pw", "broker-secret-pw", "backend-secret-pw"):
            assert secret not in text
        assert "postgresql+psycopg://mirage:**********@db:5432/mirage" in text  # still says where
    assert settings.database_url == "postgresql+psycopg://mirage:db-secret-pw@db:5432/mirage"
