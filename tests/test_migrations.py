"""Migrations: empty → head → base on SQLite and PostgreSQL, and models match migrations."""

from __future__ import annotations

import asyncio

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from bot.database import downgrade, is_sqlite, make_engine, upgrade
from bot.models import Base
from bot.web.search import include_in_autogenerate

TABLES = {"guilds", "members", "jobs", "images", "credit_entries"}


async def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
    finally:
        await engine.dispose()


async def _diff(url: str) -> list[object]:
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:

            def compare(sync_conn: object) -> list[object]:
                context = MigrationContext.configure(
                    sync_conn,
                    opts={
                        "compare_type": True,
                        "render_as_batch": is_sqlite(url),
                        # The search index (FTS5 tables, a GIN expression index) has no model.
                        "include_name": include_in_autogenerate,
                    },
                )
                return list(compare_metadata(context, Base.metadata))

            return await conn.run_sync(compare)
    finally:
        await engine.dispose()


def test_upgrade_and_downgrade(db_url: str) -> None:
    """Head creates every table; base removes them all again; head once more works."""
    upgrade(db_url)
    assert TABLES <= asyncio.run(_tables(db_url))
    downgrade(db_url, "base")
    assert not (TABLES & asyncio.run(_tables(db_url)))
    upgrade(db_url)
    assert TABLES <= asyncio.run(_tables(db_url))


def test_models_match_migrations(db_url: str) -> None:
    """Autogenerate finds nothing to add: every model change comes with its migration."""
    upgrade(db_url)
    assert asyncio.run(_diff(db_url)) == []


def test_sqlite_uses_wal(sqlite_url: str) -> None:
    """The embedded database runs in WAL mode with a busy timeout."""

    async def pragmas() -> tuple[str, int]:
        engine = make_engine(sqlite_url)
        try:
            async with engine.connect() as conn:
                mode = (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar_one()
                timeout = (await conn.exec_driver_sql("PRAGMA busy_timeout")).scalar_one()
                return mode, timeout
        finally:
            await engine.dispose()

    mode, timeout = asyncio.run(pragmas())
    assert mode == "wal"
    assert timeout >= 5000
