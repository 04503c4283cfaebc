"""SQLite: rebuild the prompt search index where a rebuild of jobs dropped its triggers

Revision ID: 0009_search_triggers
Revises: 0008_job_indexes
Create Date: 2026-11-26 09:10:00

Downgrading 0005 or 0007 on SQLite rebuilds ``jobs`` in batch mode, which drops the FTS5
triggers of 0003 with the old table; upgrading again never re-created them, so the index stopped
following new and deleted jobs and the gallery searched with LIKE for good. The rebuild may also
renumber the rowids the FTS rows share with their jobs, so the index is filled again from
``jobs`` rather than only given its triggers back. A database whose triggers are all there is
left alone; PostgreSQL (a GIN index, no triggers) has nothing to repair.

Downgrade does nothing: the index and its triggers belong to 0003, and a healthy index is what
every revision from 0003 on expects.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from alembic import op

revision: str = "0009_search_triggers"
down_revision: str | None = "0008_job_indexes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

log = logging.getLogger("alembic.runtime.migration")

SEARCH_TABLE = "jobs_fts"
TRIGGERS = ("jobs_fts_insert", "jobs_fts_delete", "jobs_fts_update")
# As created by 0003 (a migration keeps its own copy: 0003's text must never change under it).
TRIGGER_DDL = (
    f"CREATE TRIGGER jobs_fts_insert AFTER INSERT ON jobs BEGIN "
    f"INSERT INTO {SEARCH_TABLE} (rowid, prompt, job_id) VALUES (new.rowid, new.prompt, new.id); END",
    f"CREATE TRIGGER jobs_fts_delete AFTER DELETE ON jobs BEGIN "
    f"DELETE FROM {SEARCH_TABLE} WHERE rowid = old.rowid; END",
    f"CREATE TRIGGER jobs_fts_update AFTER UPDATE OF prompt, id ON jobs BEGIN "
    f"DELETE FROM {SEARCH_TABLE} WHERE rowid = old.rowid; "
    f"INSERT INTO {SEARCH_TABLE} (rowid, prompt, job_id) VALUES (new.rowid, new.prompt, new.id); END",
)


def upgrade() -> None:
    """Refill the FTS5 table from jobs and re-create its triggers, if any trigger is missing."""
    conn = op.get_bind()
    if conn.dialect.name != "sqlite" or op.get_context().as_sql:
        return  # offline (--sql) there is no database to look at
    found = conn.exec_driver_sql(
        "SELECT type, name FROM sqlite_master WHERE (type = 'table' AND name = ?)"
        " OR (type = 'trigger' AND tbl_name = 'jobs' AND name IN (?, ?, ?))",
        (SEARCH_TABLE, *TRIGGERS),
    ).all()
    names = {name for _, name in found}
    if SEARCH_TABLE not in names or names >= set(TRIGGERS):
        return  # no FTS5 in this SQLite (LIKE search), or the index is whole
    log.warning("the prompt search index lost its triggers: rebuilding it from jobs")
    for trigger in TRIGGERS:
        conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {trigger}")
    conn.exec_driver_sql(f"DELETE FROM {SEARCH_TABLE}")
    conn.exec_driver_sql(
        f"INSERT INTO {SEARCH_TABLE} (rowid, prompt, job_id) SELECT rowid, prompt, id FROM jobs"
    )
    for statement in TRIGGER_DDL:
        conn.exec_driver_sql(statement)


def downgrade() -> None:
    """Nothing to undo (see the module docstring)."""
