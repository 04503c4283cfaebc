"""Credit concepts without a database: reset periods and the configured default allowance."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from bot.credits import QuotaDefaults, period_bounds
from bot.settings import BotSettings, Period
from tests.quotautil import NOW

# --- period arithmetic (pure) -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("now", "period", "start", "end"),
    [
        (NOW, Period.DAY, datetime(2024, 5, 15, tzinfo=UTC), datetime(2024, 5, 16, tzinfo=UTC)),
        (NOW, Period.WEEK, datetime(2024, 5, 13, tzinfo=UTC), datetime(2024, 5, 20, tzinfo=UTC)),
        (NOW, Period.MONTH, datetime(2024, 5, 1, tzinfo=UTC), datetime(2024, 6, 1, tzinfo=UTC)),
        # Monday 00:00 is the first instant of its week; Sunday 23:59 the last of the previous one.
        (datetime(2024, 5, 13, tzinfo=UTC), Period.WEEK, datetime(2024, 5, 13, tzinfo=UTC), None),
        (datetime(2024, 5, 12, 23, 59, tzinfo=UTC), Period.WEEK, datetime(2024, 5, 6, tzinfo=UTC), None),
        (datetime(2024, 12, 31, 23, 0, tzinfo=UTC), Period.MONTH, None, datetime(2025, 1, 1, tzinfo=UTC)),
        (datetime(2024, 2, 29, tzinfo=UTC), Period.MONTH, None, datetime(2024, 3, 1, tzinfo=UTC)),
        # Another zone and naive datetimes are both read as the same instant in UTC.
        (
            datetime(2024, 5, 16, 1, 0, tzinfo=timezone(timedelta(hours=3))),
            Period.DAY,
            datetime(2024, 5, 15, tzinfo=UTC),
            None,
        ),
        (datetime(2024, 5, 15, 23, 59), Period.DAY, datetime(2024, 5, 15, tzinfo=UTC), None),
    ],
)
def test_period_bounds(now: datetime, period: Period, start: datetime | None, end: datetime | None) -> None:
    got_start, got_end = period_bounds(now, period)
    if start is not None:
        assert got_start == start
    if end is not None:
        assert got_end == end
    assert got_start <= now.replace(tzinfo=now.tzinfo or UTC) < got_end


def test_defaults_from_settings() -> None:
    settings = BotSettings(credit_limit=7, credit_period=Period.WEEK)
    assert QuotaDefaults.from_settings(settings) == QuotaDefaults(limit=7, period=Period.WEEK)
