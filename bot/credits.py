"""Credit concepts: the default allowance, reset periods, a member's report, and a refusal.

Values and pure functions only; ``bot.quota`` applies them to the database.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from bot.models import utcnow
from bot.settings import BotSettings, Period


@dataclass(frozen=True)
class QuotaDefaults:
    """The allowance that applies when neither the member nor the guild sets one."""

    limit: int
    period: Period

    @classmethod
    def from_settings(cls, settings: BotSettings) -> QuotaDefaults:
        """The defaults configured in the bot's settings (``CREDIT_LIMIT``, ``CREDIT_PERIOD``)."""
        return cls(limit=settings.credit_limit, period=Period(settings.credit_period))


class InsufficientCredits(Exception):
    """A reservation the member cannot afford. Nothing was charged."""

    def __init__(self, cost: int, remaining: int, resets_at: datetime) -> None:
        self.cost = cost
        self.remaining = remaining
        self.resets_at = resets_at
        super().__init__(
            f"This costs {_credits(cost)} but you have {_credits(remaining)} left; "
            f"your allowance renews at {resets_at:%Y-%m-%d %H:%M} UTC."
        )


@dataclass
class CreditReport:
    """A member's credit account as ``/info`` and ``/quota show`` present it."""

    limit: int  # the effective allowance per period
    period: Period
    used: int  # allowance spent in the current period
    bonus: int  # granted credits left
    remaining: int  # what the member can still spend now: allowance left + bonus
    resets_at: datetime  # when the current period ends


def _credits(n: int) -> str:
    return f"{n} credit" if n == 1 else f"{n} credits"


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return utcnow()
    # Naive datetimes are taken as UTC, like everywhere else in the models.
    return now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)


def period_bounds(now: datetime, period: Period) -> tuple[datetime, datetime]:
    """The UTC period containing ``now``: (start, end). Weeks start on Monday."""
    now = _utc(now)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == Period.DAY:
        return day, day + timedelta(days=1)
    if period == Period.WEEK:
        start = day - timedelta(days=day.weekday())
        return start, start + timedelta(days=7)
    start = day.replace(day=1)
    if start.month == 12:
        return start, start.replace(year=start.year + 1, month=1)
    return start, start.replace(month=start.month + 1)


def _period(value: str | None) -> Period | None:
    try:
        return Period(value) if value else None
    except ValueError:
        return None  # an unknown stored value falls through to the next level
