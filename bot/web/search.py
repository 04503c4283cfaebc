"""Full-text search over prompts: PostgreSQL text search, SQLite FTS5, or LIKE as a last resort.

The index objects (created by migration 0003) live outside the SQLAlchemy models: an FTS5 table
and its shadow tables, and a PostgreSQL expression index. ``include_in_autogenerate`` tells
Alembic's comparison to leave them alone.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from sqlalchemy import ColumnElement, String, and_, func, literal_column, text
from sqlalchemy.ext.asyncio import AsyncSession

from bot.models import Job

log = logging.getLogger(__name__)

SQLITE_SEARCH_TABLE = "jobs_fts"
SQLITE_TRIGGERS = ("jobs_fts_insert", "jobs_fts_delete", "jobs_fts_update")
PG_SEARCH_INDEX = "ix_jobs_prompt_search"
PG_TEXT_CONFIG = "english"
MAX_QUERY_CHARS = 200
MAX_TERMS = 12

_TERM_RE = re.compile(r'-?"[^"]*"|\S+')


def include_in_autogenerate(name: str | None, type_: str, parent_names: dict[str, Any]) -> bool:
    """Alembic ``include_name`` hook: skip the search index objects the models do not declare."""
    if (
        type_ == "table"
        and name is not None
        and (name == SQLITE_SEARCH_TABLE or name.startswith(SQLITE_SEARCH_TABLE + "_"))
    ):
        return False
    return not (type_ == "index" and name == PG_SEARCH_INDEX)


def normalise_query(raw: str) -> str:
    """The query as searched: whitespace collapsed, NULs made spaces and length bounded."""
    # PostgreSQL text cannot hold a NUL: passed on to websearch_to_tsquery, it fails the query.
    return " ".join(raw.replace("\x00", " ").split())[:MAX_QUERY_CHARS]


def terms(query: str) -> list[tuple[str, bool]]:
    """Split a web-search style query into (words, excluded) terms.

    ``"a phrase"`` stays one term and a leading ``-`` excludes it, as in ``websearch_to_tsquery``.
    Terms with no letters or digits are dropped.
    """
    found: list[tuple[str, bool]] = []
    for match in _TERM_RE.finditer(query):
        token = match.group(0)
        excluded = token.startswith("-") and len(token) > 1
        if excluded:
            token = token[1:]
        words = " ".join(re.findall(r"\w+", token))
        if words:
            found.append((words, excluded))
        if len(found) >= MAX_TERMS:
            break
    return found


def fts5_query(query: str) -> str | None:
    """An FTS5 MATCH expression for ``query`` with every term quoted, so input is never syntax.

    None when nothing searchable is left, or when every term is an exclusion (FTS5 cannot
    express "everything but").
    """
    parts = terms(query)
    included = [f'"{words}"' for words, excluded in parts if not excluded]
    if not included:
        return None
    expression = " AND ".join(included)
    for words, excluded in parts:
        if excluded:
            expression += f' NOT "{words}"'
    return expression


async def fts5_search_ready(session: AsyncSession) -> bool:
    """Whether SQLite has the FTS5 table *and* the triggers that keep it current.

    FTS5 may be missing from the SQLite build (no table), and a later migration that rebuilds
    ``jobs`` in batch mode drops its triggers with the old table; an index that stopped
    following new jobs would quietly miss them, so either case searches with LIKE instead.
    """
    insert, delete, update = SQLITE_TRIGGERS
    found = await session.scalar(
        text(
            "SELECT count(*) FROM sqlite_master WHERE (type = 'table' AND name = :table)"
            " OR (type = 'trigger' AND tbl_name = 'jobs' AND name IN (:insert, :delete, :update))"
        ),
        {"table": SQLITE_SEARCH_TABLE, "insert": insert, "delete": delete, "update": update},
    )
    if found == 1 + len(SQLITE_TRIGGERS):
        return True
    if found:
        log.warning("the prompt search index lost its triggers (a jobs table rebuild?): searching with LIKE")
    return False


def _like_pattern(words: str) -> str:
    escaped = words.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


async def matching(session: AsyncSession, query: str) -> ColumnElement[bool] | None:
    """A condition on ``Job`` that holds for jobs whose prompt matches ``query``.

    None means the query has nothing searchable; callers then show no results rather than all.
    """
    dialect = session.bind.dialect.name if session.bind is not None else ""
    if dialect == "postgresql":
        if not terms(query):
            return None
        config = literal_column(f"'{PG_TEXT_CONFIG}'")
        # The expression matches the GIN index of migration 0003 word for word, so it is used.
        return func.to_tsvector(config, Job.prompt).bool_op("@@")(func.websearch_to_tsquery(config, query))
    if dialect == "sqlite" and await fts5_search_ready(session):
        expression = fts5_query(query)
        if expression is None:
            return None
        ids = (
            text(f"SELECT job_id FROM {SQLITE_SEARCH_TABLE} WHERE {SQLITE_SEARCH_TABLE} MATCH :q")
            .bindparams(q=expression)
            .columns(job_id=String)
        )
        return Job.id.in_(ids)
    parts = terms(query)
    if not any(not excluded for _, excluded in parts):
        return None
    conditions = [
        (~Job.prompt.ilike(_like_pattern(words), escape="\\"))
        if excluded
        else Job.prompt.ilike(_like_pattern(words), escape="\\")
        for words, excluded in parts
    ]
    return and_(*conditions)
