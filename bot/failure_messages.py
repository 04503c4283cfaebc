"""The fixed sentences a member reads when a job fails, one per ``ErrorCode``.

Members see only these sentences; the worker's own text (which may name files, devices or an
API's wording) goes to the logs. A sentence suggests the other engine only where switching can
help (the engine is down, failed or was too slow) and only when that engine is configured, so
nobody is sent to an engine that does not exist.

Content rules, one family of messages whatever said no:

- ``CONTENT_POLICY``: the OpenAI engine's moderation refused the prompt or the image (OpenAI's
  ``content_policy_violation`` / ``moderation_blocked`` errors, which the OpenAI engine maps to
  this code) — :data:`CONTENT_POLICY_MESSAGE`;
- ``BLOCKED``: this server's own image classifier held the result back —
  :data:`BLOCKED_MESSAGE`;
- banned words stop a prompt before any job exists (``bot.banned_words.banned_words_message``).

Neither content message suggests the other engine: that would be advice on getting around the
rules.
"""

from __future__ import annotations

from workers.schema import Engine, ErrorCode

CONTENT_POLICY_MESSAGE = (
    "The image service's safety system refused this request. Please rephrase your prompt "
    "(or use another image) and try again."
)
BLOCKED_MESSAGE = (
    "This server's safety filter held back the result, so it was not posted. Please rephrase "
    "your prompt and try again."
)

# Reasons recorded on the job (its ``error``; the member reads the code's sentence below).
GRID_GONE = "The grid this image comes from is no longer available."
INPUT_GONE = "The image this job starts from is no longer available."
STORE_FAILED = "The finished image could not be stored (the media store is unavailable)."
STORE_DOWN = "The image store could not be reached when the button was pressed."

FAILURE_MESSAGES: dict[ErrorCode, str] = {
    ErrorCode.BAD_INPUT: "The image or settings could not be used (the image may be corrupt, too large "
    "or in an unsupported format). Please try another image or different settings.",
    ErrorCode.CONTENT_POLICY: CONTENT_POLICY_MESSAGE,
    ErrorCode.BLOCKED: BLOCKED_MESSAGE,
    ErrorCode.ENGINE_UNAVAILABLE: "The image engine is not available right now. Please try again later.",
    ErrorCode.ENGINE_ERROR: "The image engine failed while making this image. Please try again.",
    ErrorCode.TIMEOUT: "This job took too long and was stopped. Please try again in a while.",
    ErrorCode.CANCELLED: "This job was cancelled.",
    ErrorCode.STORAGE: "The image store could not be reached, so this image could not be kept or shown. "
    "Please try again in a moment.",
}

# Failures where the other engine could do the job; content refusals are deliberately absent.
_SWITCH_HELPS = frozenset({ErrorCode.ENGINE_UNAVAILABLE, ErrorCode.ENGINE_ERROR, ErrorCode.TIMEOUT})


def fallback_engine(engine: Engine | str | None, *, openai_configured: bool) -> Engine | None:
    """The engine to suggest after ``engine`` failed, or ``None`` when there is no other.

    ``None`` for ``engine`` means the server's default, SDXL. SDXL is the bot's own engine and
    always deployed; OpenAI only when the owner configured it.
    """
    failed = _engine(engine)
    if failed is Engine.OPENAI:
        return Engine.SDXL
    return Engine.OPENAI if openai_configured else None


def failure_message(
    code: ErrorCode | str | None,
    *,
    engine: Engine | str | None = None,
    openai_configured: bool = False,
) -> str:
    """The member-facing sentence for a failed job.

    ``code`` may be the raw ``jobs.error_code`` column: unknown or missing codes read as an engine
    error. ``engine`` is the engine the job ran on; the other one is suggested when switching
    can help and it is available (:func:`fallback_engine`).
    """
    failure = _code(code)
    message = FAILURE_MESSAGES[failure]
    if failure in _SWITCH_HELPS:
        other = fallback_engine(engine, openai_configured=openai_configured)
        if other is not None:
            message += f" You can also try the {_ENGINE_NAMES[other]} engine with `--model {other.value}`."
    return message


_ENGINE_NAMES = {Engine.SDXL: "SDXL", Engine.OPENAI: "OpenAI"}


def _code(code: ErrorCode | str | None) -> ErrorCode:
    if isinstance(code, ErrorCode):
        return code
    try:
        return ErrorCode(code) if code else ErrorCode.ENGINE_ERROR
    except ValueError:
        return ErrorCode.ENGINE_ERROR


def _engine(engine: Engine | str | None) -> Engine:
    if isinstance(engine, Engine):
        return engine
    try:
        return Engine(engine) if engine else Engine.SDXL
    except ValueError:
        return Engine.SDXL
