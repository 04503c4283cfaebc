"""Turning OpenAI client exceptions into member-facing ``WorkerError``s, with no secret in them.

API error bodies can echo part of the key ("Incorrect API key provided: sk-ab***yz"), so no
server text reaches a member or a log line without going through ``redact``; auth failures use
a fixed message and never the server's.
"""

from __future__ import annotations

import email.utils
import re
import time

import openai

from workers.schema import ErrorCode, WorkerError

CONTENT_POLICY_CODES = frozenset({"content_policy_violation", "moderation_blocked"})
RETRYABLE_STATUS = frozenset({408, 409, 429})  # plus every 5xx

UNAVAILABLE_MESSAGE = (
    "The OpenAI image engine is unavailable right now (the bot's OpenAI credentials are missing or were "
    "rejected). Please tell a server admin, or use --model sdxl."
)
CONTENT_POLICY_MESSAGE = (
    "OpenAI's safety system rejected this request. Please rephrase your prompt (or use another "
    "image) and try again."
)

_KEY_PATTERN = re.compile(r"\b(sk|rk|sess)-[A-Za-z0-9_\-*.]{4,}")
_MAX_TEXT = 300


def redact(text: str, secret: str = "") -> str:
    """``text`` without ``secret`` or anything shaped like an OpenAI key, shortened for a message."""
    if secret and len(secret) >= 4:
        text = text.replace(secret, "[redacted]")
    text = _KEY_PATTERN.sub("[redacted]", text)
    text = " ".join(text.split())
    return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 1] + "…"


def error_code(exc: openai.APIStatusError) -> str | None:
    """The ``error.code`` of an API error body (the client unwraps ``{"error": …}`` already)."""
    if exc.code:
        return exc.code
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("code") is not None:
            return str(inner["code"])
    return None


def server_message(exc: openai.APIError) -> str:
    """The API's own ``error.message`` where there is one (not the client's "Error code: …" prefix)."""
    body = exc.body
    if isinstance(body, dict) and isinstance(body.get("message"), str) and body["message"]:
        return body["message"]
    return exc.message


def is_retryable(exc: openai.APIStatusError) -> bool:
    """429 (except an exhausted quota, which waiting will not fix), 408, 409 and 5xx."""
    if exc.status_code == 429 and error_code(exc) == "insufficient_quota":
        return False
    return exc.status_code in RETRYABLE_STATUS or exc.status_code >= 500


def retry_after_s(exc: openai.APIStatusError, now: float | None = None) -> float | None:
    """The requested wait in seconds: ``retry-after-ms``, else ``retry-after`` (seconds or a date)."""
    headers = exc.response.headers
    raw_ms = headers.get("retry-after-ms")
    if raw_ms is not None:
        try:
            return max(0.0, float(raw_ms) / 1000)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    parsed = email.utils.parsedate_tz(raw)
    if parsed is None:
        return None
    return max(0.0, email.utils.mktime_tz(parsed) - (time.time() if now is None else now))


def describe(exc: BaseException, secret: str = "") -> str:
    """A log-safe one-liner for an exception: class, status, code, request id, redacted message."""
    parts = [type(exc).__name__]
    if isinstance(exc, openai.APIStatusError):
        parts.append(f"status={exc.status_code}")
        code = error_code(exc)
        if code:
            parts.append(f"code={code}")
        if exc.request_id:
            parts.append(f"request_id={exc.request_id}")
    message = server_message(exc) if isinstance(exc, openai.APIError) else str(exc)
    if not isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
        parts.append(redact(message, secret))
    return " ".join(parts)


def to_worker_error(exc: openai.OpenAIError, model: str, secret: str = "") -> WorkerError:
    """The member-facing error for a failure that will not be (or no longer be) retried."""
    if isinstance(exc, openai.APITimeoutError):
        return WorkerError(
            ErrorCode.TIMEOUT, f"{model} did not answer in time. Please try again in a moment."
        )
    if isinstance(exc, openai.APIConnectionError):
        return WorkerError(
            ErrorCode.ENGINE_ERROR, "The OpenAI image engine could not reach OpenAI. Please try again later."
        )
    if not isinstance(exc, openai.APIStatusError):
        return WorkerError(ErrorCode.ENGINE_ERROR, "The OpenAI image engine failed unexpectedly.")
    code = error_code(exc)
    status = exc.status_code
    # Older rejections sometimes came without a code; the wording is the stable part.
    if code in CONTENT_POLICY_CODES or (status == 400 and "safety system" in server_message(exc).lower()):
        return WorkerError(ErrorCode.CONTENT_POLICY, CONTENT_POLICY_MESSAGE)
    if status in (401, 403):
        return WorkerError(ErrorCode.ENGINE_UNAVAILABLE, UNAVAILABLE_MESSAGE)
    if code == "insufficient_quota":
        return WorkerError(
            ErrorCode.ENGINE_UNAVAILABLE,
            "The OpenAI image engine is unavailable right now (the OpenAI account is out of credit). "
            "Please tell a server admin, or use --model sdxl.",
        )
    if status == 404:
        return WorkerError(
            ErrorCode.ENGINE_UNAVAILABLE,
            f"The OpenAI model {model} is not available to this bot (retired or not enabled). "
            "Please tell a server admin, or use --model sdxl.",
        )
    if status == 429:
        return WorkerError(
            ErrorCode.ENGINE_ERROR, "OpenAI is rate limiting the bot right now. Please try again in a minute."
        )
    if status >= 500:
        return WorkerError(
            ErrorCode.ENGINE_ERROR, f"OpenAI's image service failed (HTTP {status}). Please try again later."
        )
    if status in (400, 413, 422):
        return WorkerError(
            ErrorCode.BAD_INPUT, f"OpenAI refused the request: {redact(server_message(exc), secret)}"
        )
    return WorkerError(ErrorCode.ENGINE_ERROR, f"OpenAI returned HTTP {status}. Please try again later.")
