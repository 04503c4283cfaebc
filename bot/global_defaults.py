"""The owners' global defaults (``/mirage defaults``): one database row between settings and guilds.

Resolution, most specific first: a member's own setting, then their guild's (credits only), then
the owners' global default stored here, then the bot's settings (``CREDIT_LIMIT``,
``CREDIT_PERIOD``, ``DEFAULT_ENGINE``, ``DEFAULT_VISIBILITY``). The row is read in the same
transaction as each job, so every bot process sees a change at once.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from bot.credits import QuotaDefaults, _period
from bot.models import GlobalDefaults, utcnow
from bot.settings import BotSettings
from workers.schema import Engine, Visibility

ROW_ID = 1
FIELDS = ("credit_limit", "credit_period", "default_engine", "default_visibility")


async def load(session: AsyncSession) -> GlobalDefaults | None:
    """The stored global defaults, or None when the owners never set any."""
    return await session.scalar(select(GlobalDefaults).where(GlobalDefaults.id == ROW_ID))


async def store(session: AsyncSession, **values: Any) -> GlobalDefaults:
    """Set (or with ``None``, clear) some of the global defaults; the others stay."""
    row = await load(session)
    if row is None:
        row = GlobalDefaults(id=ROW_ID)
        session.add(row)
    for name, value in values.items():
        if name not in FIELDS:
            raise ValueError(f"unknown global default {name!r}")
        setattr(row, name, value)
    row.updated_at = utcnow()
    await session.flush()
    return row


def quota_defaults(settings: BotSettings, row: GlobalDefaults | None) -> QuotaDefaults:
    """The allowance below guilds and members: the global default, else the settings'."""
    base = QuotaDefaults.from_settings(settings)
    if row is None:
        return base
    limit = base.limit if row.credit_limit is None else row.credit_limit
    return QuotaDefaults(limit=limit, period=_period(row.credit_period) or base.period)


def overlay(settings: BotSettings, row: GlobalDefaults | None) -> BotSettings:
    """``settings`` with the global default engine and visibility in place of the configured ones."""
    if row is None:
        return settings
    update: dict[str, Any] = {}
    if row.default_engine in {e.value for e in Engine}:
        update["default_engine"] = Engine(row.default_engine)
    if row.default_visibility in {v.value for v in Visibility}:
        update["default_visibility"] = Visibility(row.default_visibility)
    return settings.model_copy(update=update) if update else settings


async def current(session: AsyncSession, settings: BotSettings) -> tuple[BotSettings, QuotaDefaults]:
    """The effective settings and allowance defaults, global defaults applied."""
    row = await load(session)
    return overlay(settings, row), quota_defaults(settings, row)


def describe(settings: BotSettings, row: GlobalDefaults | None) -> str:
    """The effective global defaults in words, naming those that come from the settings."""
    effective, quota = overlay(settings, row), quota_defaults(settings, row)
    unset = [name for name in FIELDS if row is None or getattr(row, name) is None]
    text = (
        f"Global defaults: {quota.limit} credits per {quota.period.value}, "
        f"engine {Engine(effective.default_engine).value}, "
        f"visibility {Visibility(effective.default_visibility).value}."
    )
    return text + (f" From the settings: {', '.join(unset)}." if unset else "")
