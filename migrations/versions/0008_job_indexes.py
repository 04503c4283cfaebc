"""Indexes for two hot job queries: undelivered results and a DM's paying account

Revision ID: 0008_job_indexes
Revises: 0007_reply_message
Create Date: 2026-11-26 09:00:00

The tracker looks for final jobs whose result has not gone out yet on every pass (twice a
second); final statuses are nearly every row, so without an index on ``delivered`` each pass
read the whole table. A command in a DM finds the member's latest guild job by ``user_id``,
which no index covered either.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0008_job_indexes"
down_revision: str | None = "0007_reply_message"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create the two indexes (no table rebuild on SQLite)."""
    op.create_index("ix_jobs_delivered_finished", "jobs", ["delivered", "finished_at"])
    op.create_index("ix_jobs_user_created", "jobs", ["user_id", "created_at"])


def downgrade() -> None:
    """Drop them again."""
    op.drop_index("ix_jobs_user_created", table_name="jobs")
    op.drop_index("ix_jobs_delivered_finished", table_name="jobs")
