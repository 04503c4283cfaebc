"""Logging for the bot process: plain text or one JSON object per line, never secrets.

Settings are never logged wholesale; secrets are ``SecretStr`` and print as ``**********``.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from bot.settings import BotSettings


class JsonFormatter(logging.Formatter):
    """One JSON object per record, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        """Serialise the record with its time, level, logger and message."""
        data = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


def setup_logging(settings: BotSettings) -> None:
    """Configure the root logger once for the bot process."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    # discord.py's HTTP layer logs every request at DEBUG; keep it at INFO unless asked.
    logging.getLogger("discord.http").setLevel(max(logging.INFO, root.level))
