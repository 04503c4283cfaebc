"""Alembic environment: async engines, batch mode on SQLite, URL from the bot's settings."""

from __future__ import annotations

import asyncio
import logging.config
import os
from collections import Counter

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


def _sqlite_foreign_keys(connection: Connection, on: bool | None = None) -> bool:
    """Set SQLite's foreign key enforcement (None: leave it); returns whether it was on.

    On the driver's connection: through SQLAlchemy a transaction would open first, and SQLite
    ignores ``PRAGMA foreign_keys`` inside one.
    """
    cursor = connection.connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys")
        was_on = bool(cursor.fetchone()[0])
        if on is not None:
            cursor.execute(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}")
        return was_on
    finally:
        cursor.close()


def _broken_keys(connection: Connection) -> Counter[tuple[str, str]]:
    """SQLite rows whose foreign key finds no parent, counted per (table, parent table)."""
    rows = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    return Counter((row[0], row[2]) for row in rows)


def _configure(connection: Connection) -> None:
    sqlite = is_sqlite(str(connection.engine.url))
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=sqlite,
        # The engine takes SQLite's write lock with BEGIN IMMEDIATE and lets pysqlite commit
        # nothing on its own, so DDL is transactional there too: one transaction for the whole
        # run, as on PostgreSQL, so that a failed step or key check below leaves nothing half done.
        transactional_ddl=True,
        compare_type=True,
        include_name=include_in_autogenerate,
    )
    # Batch mode rebuilds a SQLite table by copying it and dropping the original. With foreign keys
    # enforced (the bot's engines turn them on) that DROP first deletes every row, so ON DELETE
    # CASCADE empties the tables that reference it and SET NULL cuts their links. As SQLite's own
    # procedure for table rebuilds says: enforcement off, run, then check the keys before commit
    # (only for breaks the run made: an old orphan must not block every upgrade).
    # A caller's connection already in a transaction cannot change it, and runs as it is.
    relax = sqlite and not connection.in_transaction()
    enforced = _sqlite_foreign_keys(connection, on=False) if relax else False
    try:
        with context.begin_transaction():
            migration = context.get_context()
            start = migration.get_current_heads()
            # Nothing to check when already at the head asked for, or when only comparing (check).
            destination = migration.opts.get("destination_rev")
            idle = destination is None or (
                destination in ("head", "heads") and set(start) == set(context.script.get_heads())
            )
            broken = _broken_keys(connection) if relax and not idle else None
            context.run_migrations()
            if broken is not None and migration.get_current_heads() != start:
                new = _broken_keys(connection) - broken
                if new:
                    raise RuntimeError(f"the migration broke foreign keys (table, parent: rows): {dict(new)}")
    finally:
        if enforced:
            _sqlite_foreign_keys(connection, on=True)


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
