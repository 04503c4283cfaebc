"""The one door from job code to Prometheus metrics, which are optional.

Job code calls :func:`record_metric` by name; when ``prometheus_client`` is not installed, or a
metric call fails, the job goes on unaffected.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

try:  # Prometheus metrics are optional: the bot works the same without them.
    from bot import metrics as _metrics
except ImportError:  # pragma: no cover - prometheus_client not installed
    _metrics = None  # type: ignore[assignment]


def record_metric(name: str, *args: Any) -> None:
    """Call ``bot.metrics.<name>(*args)`` if metrics are available; never let metrics break a job."""
    if _metrics is None:
        return
    try:
        getattr(_metrics, name)(*args)
    except Exception:
        log.debug("metric %s failed", name, exc_info=True)
