"""Migrations: empty → head → base on SQLite and PostgreSQL, and models match migrations."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, event, inspect, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from bot.access import account_guild
from bot.database import downgrade, is_sqlite, make_engine, make_sessionmaker, upgrade
from bot.lifecycle import open_work
from bot.models import Base, Guild
from bot.operations import Actor
from bot.web.search import SQLITE_SEARCH_TABLE, fts5_search_ready, include_in_autogenerate

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


# --------------------------------------------------------------------------- populated databases

T0 = datetime(2026, 1, 1, tzinfo=UTC)
TABLE = Base.metadata.tables


async def _on(url: str, work: Callable[[Connection], Any]) -> Any:
    """Run ``work`` on a connection to ``url`` in one committed transaction."""
    engine = make_engine(url)
    try:
        async with engine.begin() as conn:
            return await conn.run_sync(work)
    finally:
        await engine.dispose()


def _job(job_id: str, **values: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": job_id,
        "member_id": 1,
        "user_id": 2**60 + 1,
        "guild_id": 2**60 + 2,
        "channel_id": 2**60 + 3,
        "kind": "imagine",
        "prompt": "a red fox",
        "engine": "sdxl",
        "visibility": "public",
        "status": "done",
        "delivered": True,
        "created_at": T0,
        # Every row names the same columns: an executemany takes them from its first row.
        "finished_at": None,
        "parent_id": None,
        "parent_index": None,
    }
    return row | values


def _seed(conn: Connection) -> None:
    """A member with a family of jobs and every kind of row that hangs off members and jobs."""
    conn.execute(TABLE["guilds"].insert(), [{"id": 2**60 + 2, "name": "g"}])
    conn.execute(TABLE["members"].insert(), [{"id": 1, "guild_id": 2**60 + 2, "user_id": 2**60 + 1}])
    conn.execute(
        TABLE["jobs"].insert(),
        [_job("root"), *(_job(f"child{n}", parent_id="root", parent_index=n) for n in range(1, 5))],
    )
    conn.execute(
        TABLE["images"].insert(),
        [{"job_id": j, "index": 0, "key": f"{j}.webp", "width": 8, "height": 8} for j in ("root", "child1")],
    )
    conn.execute(TABLE["favourites"].insert(), [{"member_id": 1, "job_id": "root"}])
    conn.execute(
        TABLE["job_inputs"].insert(), [{"job_id": "child2", "role": "image", "index": 0, "key": "in"}]
    )
    conn.execute(
        TABLE["credit_entries"].insert(), [{"member_id": 1, "job_id": "root", "kind": "reserve", "amount": 1}]
    )
    conn.execute(TABLE["member_options"].insert(), [{"member_id": 1, "name": "hd", "value": "--q 2"}])


def _counts(conn: Connection) -> dict[str, int]:
    tables = (
        "guilds",
        "members",
        "jobs",
        "images",
        "favourites",
        "job_inputs",
        "credit_entries",
        "member_options",
    )
    found = {table: conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one() for table in tables}
    found["parent links"] = conn.execute(
        text("SELECT count(*) FROM jobs WHERE parent_id = 'root'")
    ).scalar_one()
    return found


def test_downgrade_and_upgrade_keep_a_populated_database(db_url: str) -> None:
    """A downgrade that rebuilds tables (SQLite batch mode) deletes nothing through the foreign keys.

    Rebuilding ``members`` or ``jobs`` copies it and drops the original; with the bot's
    ``PRAGMA foreign_keys=ON`` that DROP deleted every row first, so ON DELETE CASCADE emptied
    jobs, images, favourites, inputs and the ledger, and ON DELETE SET NULL cut every parent link.
    """
    upgrade(db_url)
    asyncio.run(_on(db_url, _seed))
    before = asyncio.run(_on(db_url, _counts))
    assert before["images"] and before["parent links"] == 4
    downgrade(db_url, "0004_prefer")  # drops columns of guilds, members and jobs
    assert asyncio.run(_on(db_url, _counts)) == before
    upgrade(db_url)
    assert asyncio.run(_on(db_url, _counts)) == before
    assert asyncio.run(_diff(db_url)) == []  # the rebuilt tables kept their constraints and indexes


def _fts_ids(conn: Connection, words: str) -> set[str]:
    rows = conn.execute(
        text(f"SELECT job_id FROM {SQLITE_SEARCH_TABLE} WHERE {SQLITE_SEARCH_TABLE} MATCH :q"), {"q": words}
    )
    return {row[0] for row in rows}


def test_sqlite_search_index_follows_jobs_again_after_a_downgrade(sqlite_url: str) -> None:
    """Head restores the FTS5 triggers a batch rebuild of ``jobs`` dropped, and re-indexes.

    The rebuild also renumbers rowids (the FTS rows share them), so the index is refilled, not only
    given its triggers: with stale rows a new job's insert collides with one (and fails), and a
    delete removes the wrong row.
    """
    upgrade(sqlite_url)

    def has_fts5(conn: Connection) -> bool:
        return bool(
            conn.execute(
                text("SELECT count(*) FROM sqlite_master WHERE name = :t"), {"t": SQLITE_SEARCH_TABLE}
            ).scalar()
        )

    if not asyncio.run(_on(sqlite_url, has_fts5)):
        pytest.skip("this SQLite has no FTS5")

    def seed(conn: Connection) -> None:
        _seed(conn)
        conn.execute(
            TABLE["jobs"].insert(), [_job("fox2", prompt="another fox"), _job("owl", prompt="a snowy owl")]
        )
        conn.execute(text("DELETE FROM jobs WHERE id = 'fox2'"))  # a gap in the rowids

    asyncio.run(_on(sqlite_url, seed))
    downgrade(sqlite_url, "0006_global_defaults")  # rebuilds jobs (drops reply_message_id)
    upgrade(sqlite_url)

    def after(conn: Connection) -> None:
        conn.execute(TABLE["jobs"].insert(), [_job("whale", prompt="a blue whale")])
        assert _fts_ids(conn, "whale") == {"whale"}  # the insert trigger is back
        assert _fts_ids(conn, "owl") == {"owl"}
        conn.execute(text("DELETE FROM jobs WHERE id = 'owl'"))
        assert _fts_ids(conn, "owl") == set()  # the delete trigger removed the right row
        assert _fts_ids(conn, "fox") == {"root", "child1", "child2", "child3", "child4"}

    asyncio.run(_on(sqlite_url, after))

    async def ready() -> bool:
        engine = make_engine(sqlite_url)
        try:
            async with make_sessionmaker(engine)() as session:
                return await fts5_search_ready(session)
        finally:
            await engine.dispose()

    assert asyncio.run(ready())


# --------------------------------------------------------------------------- hot queries

_SQLITE_SEARCH = re.compile(r"SEARCH (\w+) USING (?:COVERING )?INDEX \w+ \((.*)\)")


async def _explain(engine: AsyncEngine, statement: str, parameters: Any) -> list[tuple[str, str]]:
    """(table on SQLite, index on PostgreSQL; condition) for each index search in the plan."""
    async with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            rows = (await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters)).all()
            return [(m[1], m[2]) for row in rows if (m := _SQLITE_SEARCH.search(row[-1]))]
        # No sequential scan unless no index can serve the query at all.
        await conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
        plan = (await conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + statement, parameters)).scalar_one()
        plan = json.loads(plan) if isinstance(plan, str) else plan
        found: list[tuple[str, str]] = []

        def walk(node: dict[str, Any]) -> None:
            if "Index Cond" in node:
                found.append((node.get("Index Name", ""), node["Index Cond"]))
            for child in node.get("Plans", []):
                walk(child)

        walk(plan[0]["Plan"])
        return found


async def _seed_many(sessions: async_sessionmaker[AsyncSession]) -> None:
    """2,000 jobs of 50 members, nearly all finished and delivered, as in a bot that ran a while."""
    users = range(50)
    rows = []
    for n in range(2000):
        user = n % 50
        status = "done" if n < 1980 else ("waiting", "queued", "running", "failed")[n % 4]
        rows.append(
            _job(
                f"j{n}",
                member_id=user + 1,
                user_id=2**60 + user,
                guild_id=0 if n % 7 == 0 else 2**60 + 2,
                status=status,
                delivered=n < 1980,
                created_at=T0 + timedelta(minutes=n),
                finished_at=T0 + timedelta(minutes=n, seconds=30) if status in ("done", "failed") else None,
                kind="crop" if n % 11 == 0 else "imagine",
            )
        )
    async with sessions() as session, session.begin():
        await session.execute(
            TABLE["members"].insert(),
            [{"id": u + 1, "guild_id": 2**60 + 2, "user_id": 2**60 + u} for u in users],
        )
        await session.execute(TABLE["jobs"].insert(), rows)
    async with sessions() as session, session.begin():
        await session.execute(text("ANALYZE"))


async def test_hot_queries_search_an_index(
    engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]
) -> None:
    """The queries run on every tracker pass (twice a second) and for every DM command find their
    rows through an index on the column that selects them, not by reading every job.

    The undelivered-results poll filters on final statuses, which is almost every job: only an
    index on ``delivered`` (and ``finished_at``) narrows it. The DM payer lookup
    (``account_guild``) selects by ``user_id``.
    """
    await _seed_many(sessions)
    captured: list[tuple[str, Any]] = []

    def grab(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            captured.append((statement, parameters))

    event.listen(engine.sync_engine, "before_cursor_execute", grab)
    try:
        await open_work(sessions, T0 + timedelta(days=2), timedelta(seconds=30))
        work = list(captured)
        captured.clear()
        async with sessions() as session:
            dm = Actor(guild_id=0, channel_id=1, user_id=2**60 + 7, display_name="m")
            assert await account_guild(session, dm) == 2**60 + 2
        payer = list(captured)
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", grab)

    assert len(work) == 4 and len(payer) == 1
    expected = [(s, p, "delivered" if "delivered" in s.partition("WHERE")[2] else "status") for s, p in work]
    expected += [(s, p, "user_id") for s, p in payer]
    for statement, parameters, column in expected:
        searches = await _explain(engine, statement, parameters)
        assert any(column in condition for _, condition in searches), (
            f"no index search on jobs.{column} for:\n{statement}\nplan: {searches}"
        )


# --------------------------------------------------------------------------- time columns


async def test_times_are_stored_as_utc_instants(sessions: async_sessionmaker[AsyncSession]) -> None:
    """An aware time in another zone is the same instant when read back, and compares as one.

    PostgreSQL's timestamptz converts it; SQLite keeps only the wall-clock digits, so the column
    type must convert to UTC before writing, or 12:00+02:00 comes back as 12:00 UTC.
    """
    noon_in_paris = datetime(2026, 6, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    async with sessions() as session, session.begin():
        session.add(Guild(id=2**60 + 9, name="g", created_at=noon_in_paris))
    async with sessions() as session:
        stored = await session.scalar(select(Guild.created_at).where(Guild.id == 2**60 + 9))
        assert stored == noon_in_paris and stored.utcoffset() == timedelta(0)
        # 11:30 UTC is after 10:00 UTC (12:00+02:00): the comparison must see instants, not digits.
        later = await session.scalar(
            select(Guild.id).where(Guild.created_at < datetime(2026, 6, 1, 11, 30, tzinfo=UTC))
        )
        assert later == 2**60 + 9
