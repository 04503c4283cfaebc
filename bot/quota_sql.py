"""SQL building blocks shared by the credit functions (``bot.quota``, ``bot.quota_admin``).

Core statements on the tables, spelled so PostgreSQL and SQLite both accept them.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Integer, case, literal
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import identity
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.util import identity_key
from sqlalchemy.sql.elements import ColumnElement

from bot.models import CreditEntry, Guild, Member

MEMBERS = Member.__table__
GUILDS = Guild.__table__
LEDGER = CreditEntry.__table__
NOTE_MAX = 200  # CreditEntry.note is a String(200)


def least(a: ColumnElement[Any], b: ColumnElement[Any]) -> ColumnElement[Any]:
    """The smaller of two SQL expressions."""
    # CASE instead of LEAST()/min(): PostgreSQL and SQLite spell those differently.
    return case((a < b, a), else_=b)


def greatest(a: ColumnElement[Any], b: ColumnElement[Any]) -> ColumnElement[Any]:
    """The larger of two SQL expressions."""
    return case((a > b, a), else_=b)


def int_param(value: int) -> ColumnElement[int]:
    """An integer bound as a typed SQL literal (arithmetic with columns needs the type)."""
    return literal(value, Integer)


def dialect_insert(session: AsyncSession, table: Any) -> Any:
    """A dialect INSERT, so ON CONFLICT is available on both backends."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return pg_insert(table)
    if dialect == "sqlite":
        return sqlite_insert(table)
    raise NotImplementedError(f"quota needs PostgreSQL or SQLite, not {dialect}")


def sync_member(session: AsyncSession, member_id: int, **values: Any) -> None:
    """Bring an already-loaded Member up to date without marking it dirty."""
    identity_map: identity.IdentityMap = session.identity_map
    member = identity_map.get(identity_key(Member, member_id))
    if member is not None:
        for name, value in values.items():
            set_committed_value(member, name, value)
