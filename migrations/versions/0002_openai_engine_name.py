"""the OpenAI engine has one name: rows that say "dalle" say "openai"

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 00:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Columns that hold an engine name.
ENGINE_COLUMNS = (("jobs", "engine"), ("members", "default_engine"), ("guilds", "default_engine"))


def upgrade() -> None:
    """Rename the stored engine value."""
    for table, column in ENGINE_COLUMNS:
        op.execute(f"UPDATE {table} SET {column} = 'openai' WHERE {column} = 'dalle'")


def downgrade() -> None:
    """Restore the old engine value."""
    for table, column in ENGINE_COLUMNS:
        op.execute(f"UPDATE {table} SET {column} = 'dalle' WHERE {column} = 'openai'")
