"""/prefer (suffix, options, remix), pending confirmations, and the images members give jobs

Revision ID: 0004_prefer
Revises: 0003
Create Date: 2026-11-26 01:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_prefer"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the member preference columns and the three new tables."""
    with op.batch_alter_table("members") as batch:
        batch.add_column(sa.Column("prompt_suffix", sa.Text(), nullable=True))
        batch.add_column(sa.Column("remix", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.create_table(
        "member_options",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("member_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["member_id"],
            ["members.id"],
            name="fk_member_options_member_id_members",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_member_options"),
        sa.UniqueConstraint("member_id", "name", name="uq_member_options_member_name"),
    )
    op.create_index("ix_member_options_member_id", "member_options", ["member_id"])
    op.create_table(
        "pending_confirmations",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_pending_confirmations"),
    )
    op.create_index("ix_pending_confirmations_expires_at", "pending_confirmations", ["expires_at"])
    op.create_table(
        "job_inputs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(255), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_job_inputs_job_id_jobs", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_job_inputs"),
        sa.UniqueConstraint("job_id", "role", "index", name="uq_job_inputs_job_role_index"),
    )
    op.create_index("ix_job_inputs_job_id", "job_inputs", ["job_id"])


def downgrade() -> None:
    """Drop the tables and columns again."""
    op.drop_index("ix_job_inputs_job_id", table_name="job_inputs")
    op.drop_table("job_inputs")
    op.drop_index("ix_pending_confirmations_expires_at", table_name="pending_confirmations")
    op.drop_table("pending_confirmations")
    op.drop_index("ix_member_options_member_id", table_name="member_options")
    op.drop_table("member_options")
    with op.batch_alter_table("members") as batch:
        batch.drop_column("remix")
        batch.drop_column("prompt_suffix")
