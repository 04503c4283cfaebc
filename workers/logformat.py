"""The log line format and secret redaction that the bot's and the workers' logging share.

One JSON object per record (``time`` in ISO 8601 UTC, ``level``, ``logger``, ``message``, any
``extra=`` keys, ``exc`` for a traceback, ``stack``), so a log shipper reads bot and worker lines
alike; and a :class:`Redactor` that replaces secret values and token-shaped text with
``[redacted]``.

``bot.logconfig`` and ``workers.logconfig`` build on this module: each knows its own settings
(which secrets it holds), its own token patterns and where a record's job id comes from. Workers
must never import ``bot/``, and the bot image has no torch, so this module imports only the
standard library.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar, Self
from urllib.parse import unquote, urlsplit

REDACTED = "[redacted]"
# Shorter values would redact innocent text ("1234", "admin") all over the log.
MIN_SECRET_LENGTH = 8

Pattern = tuple[re.Pattern[str], str]
"""A token-shaped text and what replaces it (``re.sub`` syntax)."""

# Attributes every LogRecord has; anything else on a record came from ``extra=`` (or a filter).
RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}

# OpenAI keys (sk-…, sk-proj-…).
OPENAI_KEY: Pattern = (re.compile(r"\bsk-[A-Za-z0-9_\-]{10,}"), "sk-" + REDACTED)
# user:password@ in any URL.
URL_PASSWORD: Pattern = (
    re.compile(r"([a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]*):[^@\s/]+@"),
    r"\1:" + REDACTED + "@",
)


def authorization_header(*schemes: str) -> Pattern:
    """An Authorization header with one of these schemes (``bearer``, ``bot``), whatever its value."""
    header = r"""(?i)(authorization["']?\s*[:=]\s*["']?)"""
    return (re.compile(header + "(" + "|".join(schemes) + r""")\s+[^\s"',}]+"""), r"\1\2 " + REDACTED)


def url_password(url: str) -> str | None:
    """The password in ``url``, if it has one."""
    try:
        return urlsplit(url).password
    except ValueError:  # an unparsable URL has no password we could find either
        return None


class Redactor:
    """Replaces known secret values and token-shaped patterns in text with ``[redacted]``.

    A subclass names the token patterns of its process in :attr:`patterns` (applied in order, so
    specific before generic) and builds itself from its settings with :meth:`of`.
    """

    patterns: ClassVar[tuple[Pattern, ...]] = (OPENAI_KEY, URL_PASSWORD)

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        values: set[str] = set()
        for secret in secrets:
            if not secret or len(secret) < MIN_SECRET_LENGTH:
                continue
            values.add(secret)
            # The same value as it appears inside a JSON string or a repr().
            values.add(json.dumps(secret)[1:-1])
            values.add(repr(secret)[1:-1])
        # Longest first, so a secret containing another is replaced whole.
        ordered = sorted(values, key=len, reverse=True)
        self._values = re.compile("|".join(re.escape(v) for v in ordered)) if ordered else None

    @classmethod
    def of(
        cls,
        secrets: Iterable[str],
        *,
        urls: Iterable[str] = (),
        env_vars: Iterable[str] = (),
        environ: Mapping[str, str] | None = None,
    ) -> Self:
        """A redactor of ``secrets``, the passwords in ``urls`` and the values of ``env_vars``."""
        env = os.environ if environ is None else environ
        values = [*secrets, *(env.get(name, "") for name in env_vars)]
        for url in urls:
            password = url_password(url)
            if password:
                values += [password, unquote(password)]
        return cls(values)

    def redact(self, text: str) -> str:
        """``text`` with every secret value and pattern replaced."""
        if self._values is not None:
            text = self._values.sub(REDACTED, text)
        for pattern, replacement in self.patterns:
            text = pattern.sub(replacement, text)
        return text


class JsonFormatter(logging.Formatter):
    """One JSON object per record, always one line: the base fields, ``extra=`` keys, traceback.

    Subclasses add fields (:meth:`fields`), drop extras (:meth:`keep`) or name more attributes
    that are the record's own rather than extras (:attr:`record_attrs`).
    """

    record_attrs: ClassVar[frozenset[str]] = RECORD_ATTRS

    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        """The fields that come first: time, level, logger and message."""
        return {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }

    def keep(self, key: str, value: Any) -> bool:
        """Whether the record's extra attribute ``key`` is written (every one, here)."""
        return True

    def format(self, record: logging.LogRecord) -> str:
        """Serialise the record: :meth:`fields`, ``extra=`` keys, traceback and stack."""
        data = self.fields(record)
        for key, value in record.__dict__.items():
            extra = key not in self.record_attrs and not key.startswith("_") and key not in data
            if extra and self.keep(key, value):
                data[key] = value
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            data["stack"] = self.formatStack(record.stack_info)
        # json.dumps escapes newlines inside strings, so one record is always one line.
        return json.dumps(data, ensure_ascii=False, default=str)
