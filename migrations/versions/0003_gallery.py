"""gallery: favourites, and full-text search over prompts

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 00:20:00

PostgreSQL searches with ``to_tsvector``/``websearch_to_tsquery`` over a GIN expression index.
SQLite gets an FTS5 table, ``jobs_fts`` (prompt, job_id), kept in step with ``jobs`` by triggers;
where the SQLite build has no FTS5 the table is skipped and the gallery falls back to LIKE.
A later migration that rebuilds ``jobs`` in SQLite batch mode drops these triggers with the old
table and must create them again (``create_sqlite_search`` below does it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

log = logging.getLogger("alembic.runtime.migration")

PG_SEARCH_INDEX = "ix_jobs_prompt_search"
SQLITE_SEARCH_TABLE = "jobs_fts"

# The FTS row shares the job's rowid so deletes find it without a scan; the gallery joins on
# job_id, which stays right even if a table rebuild renumbered rowids.
SQLITE_SEARCH_DDL = (
    f"CREATE VIRTUAL TABLE {SQLITE_SEARCH_TABLE} USING fts5("
    "prompt, job_id UNINDEXED, tokenize = 'porter unicode61 remove_diacritics 2')",
    f"INSERT INTO {SQLITE_SEARCH_TABLE} (rowid, prompt, job_id) SELECT rowid, prompt, id FROM jobs",
    f"CREATE TRIGGER jobs_fts_insert AFTER INSERT ON jobs BEGIN "
    f"INSERT INTO {SQLITE_SEARCH_TABLE} (rowid, prompt, job_id) VALUES (new.rowid, new.prompt, new.id); END",
    f"CREATE TRIGGER jobs_fts_delete AFTER DELETE ON jobs BEGIN "
    f"DELETE FROM {SQLITE_SEARCH_TABLE} WHERE rowid = old.rowid; END",
    f"CREATE TRIGGER jobs_fts_update AFTER UPDATE OF prompt, id ON jobs BEGIN "
    f"DELETE FROM {SQLITE_SEARCH_TABLE} WHERE rowid = old.rowid; "
    f"INSERT INTO {SQLITE_SEARCH_TABLE} (rowid, prompt, job_id) VALUES (new.rowid, new.prompt, new.id); END",
)


def create_sqlite_search() -> None:
    """Create the FTS5 table and its triggers, or log and skip where FTS5 is not compiled in."""
    conn = op.get_bind()
    try:
        conn.exec_driver_sql("CREATE VIRTUAL TABLE temp.fts5_probe USING fts5(x)")
        conn.exec_driver_sql("DROP TABLE temp.fts5_probe")
    except sa.exc.OperationalError:
        log.warning("this SQLite has no FTS5: gallery search falls back to LIKE")
        return
    for statement in SQLITE_SEARCH_DDL:
        conn.exec_driver_sql(statement)


def upgrade() -> None:
    """Add favourites and the search index."""
    op.create_table(
        "favourites",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("member_id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_favourites_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["member_id"], ["members.id"], name=op.f("fk_favourites_member_id_members"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_favourites")),
        sa.UniqueConstraint("member_id", "job_id", name="uq_favourites_member_job"),
    )
    with op.batch_alter_table("favourites", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_favourites_job_id"), ["job_id"], unique=False)

    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute(f"CREATE INDEX {PG_SEARCH_INDEX} ON jobs USING gin (to_tsvector('english', prompt))")
    elif dialect == "sqlite":
        create_sqlite_search()


def downgrade() -> None:
    """Drop the search index and favourites."""
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute(f"DROP INDEX IF EXISTS {PG_SEARCH_INDEX}")
    elif dialect == "sqlite":
        for trigger in ("jobs_fts_insert", "jobs_fts_delete", "jobs_fts_update"):
            op.execute(f"DROP TRIGGER IF EXISTS {trigger}")
        op.execute(f"DROP TABLE IF EXISTS {SQLITE_SEARCH_TABLE}")
    with op.batch_alter_table("favourites", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_favourites_job_id"))
    op.drop_table("favourites")
