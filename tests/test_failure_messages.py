"""Member-facing failure sentences: one per error code, the other engine suggested only when it helps."""

from __future__ import annotations

import pytest

from bot.failure_messages import (
    BLOCKED_MESSAGE,
    CONTENT_POLICY_MESSAGE,
    FAILURE_MESSAGES,
    failure_message,
    fallback_engine,
)
from workers.schema import Engine, ErrorCode


def test_every_code_has_a_sentence() -> None:
    """No error code can reach a member without a fixed sentence."""
    assert set(FAILURE_MESSAGES) == set(ErrorCode)
    assert all(text.endswith(".") for text in FAILURE_MESSAGES.values())


@pytest.mark.parametrize("code", [ErrorCode.ENGINE_UNAVAILABLE, ErrorCode.ENGINE_ERROR, ErrorCode.TIMEOUT])
def test_sdxl_failure_suggests_openai_only_when_configured(code: ErrorCode) -> None:
    """An SDXL outage points to --model openai only if OpenAI is configured."""
    with_openai = failure_message(code, engine=Engine.SDXL, openai_configured=True)
    assert with_openai.startswith(FAILURE_MESSAGES[code]) and "`--model openai`" in with_openai
    assert failure_message(code, engine=Engine.SDXL, openai_configured=False) == FAILURE_MESSAGES[code]
    assert "--model" not in failure_message(code, engine=None, openai_configured=False)


def test_openai_failure_suggests_sdxl() -> None:
    """An OpenAI outage points to the bot's own SDXL engine; legacy "dalle" rows read as OpenAI."""
    assert "`--model sdxl`" in failure_message(ErrorCode.ENGINE_UNAVAILABLE, engine=Engine.OPENAI)
    assert "`--model sdxl`" in failure_message("timeout", engine="dalle")


@pytest.mark.parametrize(
    "code", [ErrorCode.CONTENT_POLICY, ErrorCode.BLOCKED, ErrorCode.BAD_INPUT, ErrorCode.CANCELLED]
)
def test_no_engine_switch_where_it_cannot_help(code: ErrorCode) -> None:
    """Content refusals, bad input and cancellations never suggest the other engine."""
    for engine in (Engine.SDXL, Engine.OPENAI):
        assert failure_message(code, engine=engine, openai_configured=True) == FAILURE_MESSAGES[code]


def test_content_refusals_share_one_family() -> None:
    """OpenAI's moderation (CONTENT_POLICY) and this server's filter (BLOCKED) each have their sentence."""
    assert failure_message(ErrorCode.CONTENT_POLICY) == CONTENT_POLICY_MESSAGE
    assert failure_message("blocked") == BLOCKED_MESSAGE
    assert "rephrase" in CONTENT_POLICY_MESSAGE and "rephrase" in BLOCKED_MESSAGE


def test_raw_column_values_are_accepted() -> None:
    """The jobs.error_code column's text works; unknown or missing codes read as an engine error."""
    assert failure_message("bad_input") == FAILURE_MESSAGES[ErrorCode.BAD_INPUT]
    assert failure_message(None) == FAILURE_MESSAGES[ErrorCode.ENGINE_ERROR]
    assert failure_message("gremlins") == FAILURE_MESSAGES[ErrorCode.ENGINE_ERROR]


def test_fallback_engine() -> None:
    """SDXL falls back to OpenAI when configured; OpenAI always to SDXL; unknown engines read as SDXL."""
    assert fallback_engine(Engine.SDXL, openai_configured=True) is Engine.OPENAI
    assert fallback_engine(Engine.SDXL, openai_configured=False) is None
    assert fallback_engine(Engine.OPENAI, openai_configured=False) is Engine.SDXL
    assert fallback_engine("midjourney", openai_configured=True) is Engine.OPENAI
