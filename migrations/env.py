"""Alembic environment: async engines, batch mode on SQLite, URL from the bot's settings."""

from __future__ import annotations

import asyncio
import logging.config
import os

from alembic import context
from sqlalchemy.engine import Connection

from bot.database import is_sqlite, make_engine
from bot.models import Base
from bot.settings import BotSettings
from bot.web.search import include_in_autogenerate

config = context.config
if config.config_file_name is not None:
    logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _url() -> str:
    # Programmatic callers set the URL on the config; the CLI takes it from DATABASE_URL/.env.
    url = config.get_main_option("sqlalchemy.url")
    if config.config_file_name is not None and (os.environ.get("DATABASE_URL") or os.path.exists(".env")):
        url = BotSettings().database_url
    assert url, "no database URL"
    return BotSettings(database_url=url).database_url


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=is_sqlite(str(connection.engine.url)),
        compare_type=True,
        include_name=include_in_autogenerate,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    """Emit SQL without a connection (``alembic upgrade --sql``)."""
    url = _url()
    context.configure(
        url=url, target_metadata=target_metadata, render_as_batch=is_sqlite(url), literal_binds=True
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_online() -> None:
    engine = make_engine(_url())
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_configure)
            await connection.commit()
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    """Run against a live database through the same engine factory the bot uses."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        return
    asyncio.run(_run_online())


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
