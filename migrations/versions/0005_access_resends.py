"""Who may use the bot (approved and banned guilds, banned members) and jobs re-sent by the supervisor

Revision ID: 0005_access
Revises: 0004_prefer
Create Date: 2026-11-26 01:25:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_access"
down_revision: str | None = "0004_prefer"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the access columns on guilds and members, and the re-send count on jobs."""
    with op.batch_alter_table("guilds") as batch:
        batch.add_column(sa.Column("approved", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("banned", sa.Boolean(), nullable=False, server_default=sa.false()))
    with op.batch_alter_table("members") as batch:
        batch.add_column(sa.Column("banned", sa.Boolean(), nullable=False, server_default=sa.false()))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("resends", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    """Drop them again."""
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("resends")
    with op.batch_alter_table("members") as batch:
        batch.drop_column("banned")
    with op.batch_alter_table("guilds") as batch:
        batch.drop_column("banned")
        batch.drop_column("approved")
