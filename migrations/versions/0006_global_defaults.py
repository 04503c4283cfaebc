"""The owners' global defaults (/mirage defaults): allowance, period, engine and visibility

Revision ID: 0006_global_defaults
Revises: 0005_access
Create Date: 2026-11-26 02:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_global_defaults"
down_revision: str | None = "0005_access"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create the one-row global_defaults table."""
    op.create_table(
        "global_defaults",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("credit_limit", sa.Integer(), nullable=True),
        sa.Column("credit_period", sa.String(16), nullable=True),
        sa.Column("default_engine", sa.String(16), nullable=True),
        sa.Column("default_visibility", sa.String(16), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    """Drop it again."""
    op.drop_table("global_defaults")
