"""Jobs after the first of a batch edit their own follow-up message

Revision ID: 0007_reply_message
Revises: 0006_global_defaults
Create Date: 2026-11-26 04:10:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_reply_message"
down_revision: str | None = "0006_global_defaults"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add jobs.reply_message_id (NULL: the interaction's original response)."""
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("reply_message_id", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    """Drop it again."""
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("reply_message_id")
