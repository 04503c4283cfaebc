"""Message rendering: pure functions of a job row."""

from __future__ import annotations

from typing import Any

from bot.failure_messages import CONTENT_POLICY_MESSAGE, failure_message
from bot.models import Job
from bot.render import (
    MAX_NOTES_SHOWN,
    failure_content,
    file_stem,
    final_content,
    job_head,
    note_lines,
    progress_content,
    waiting_content,
)
from workers.schema import ErrorCode, JobKind


def job(kind: JobKind = JobKind.IMAGINE, **values: Any) -> Job:
    prompt = values.pop("prompt", "a red fox")
    params = values.pop("params", {"prompt": prompt})
    return Job(
        id="J" * 22,
        user_id=42,
        kind=kind.value,
        prompt=prompt,
        params=params,
        visibility=values.pop("visibility", "public"),
        parent_index=values.pop("parent_index", None),
        cost=values.pop("cost", 1),
        **values,
    )


def test_heads_name_what_each_kind_did() -> None:
    assert job_head(job()) == "**a red fox** - <@42>"
    assert job_head(job(JobKind.CROP, parent_index=3)) == "**a red fox** - Image #3 <@42>"
    assert job_head(job(JobKind.VARIATION, params={"strength": 0.5})).endswith("Variations (Subtle) by <@42>")
    assert "Variations (Strong)" in job_head(job(JobKind.VARIATION, params={"strength": 0.85}))
    assert "Upscaled (Creative)" in job_head(job(JobKind.UPSCALE, params={"strength": 0.55}))
    assert "Zoom Out 1.5x" in job_head(job(JobKind.ZOOM, params={"scale": 1.5}))
    assert "Pan Left" in job_head(job(JobKind.PAN, params={"direction": "left"}))
    assert "Make Square" in job_head(job(JobKind.SQUARE))


def test_prompt_is_escaped_and_bounded() -> None:
    head = job_head(job(prompt="**bold** " + "x" * 3000))
    assert "\\*\\*bold\\*\\*" in head and "…" in head and len(head) < 1600


def test_waiting_and_progress_texts() -> None:
    assert waiting_content(job(), 1) == "**a red fox** - <@42> (Waiting to start)"
    assert waiting_content(job(), 3) == "**a red fox** - <@42> (Waiting to start)\n-# Position 3 in line"
    assert progress_content(job(visibility="stealth"), 40).endswith("(40%) (fast, stealth)")
    relaxed = job(params={"prompt": "a red fox", "speed": "relax"})
    assert progress_content(relaxed, 7) == "**a red fox --relax** - <@42> (7%) (relax)"


def test_the_first_line_is_the_normalised_prompt_with_parameters_and_seed() -> None:
    params = {"prompt": "a red fox", "aspect": [3, 2], "width": 1216, "height": 832, "stylize": 250}
    done = job(params={**params, "speed": "turbo"}, seed=7)
    assert final_content(done) == "**a red fox --ar 3:2 --seed 7 --stylize 250 --turbo** - <@42> (turbo)"
    fast = job(params=params, seed=7)
    assert final_content(fast) == "**a red fox --ar 3:2 --seed 7 --stylize 250** - <@42> (fast)"
    vary = job(JobKind.VARIATION, params={**params, "strength": 0.5}, seed=7)
    assert job_head(vary) == "**a red fox --ar 3:2 --seed 7 --stylize 250** - Variations (Subtle) by <@42>"


def test_a_row_with_parameters_that_no_longer_validate_shows_its_plain_prompt() -> None:
    assert job_head(job(params={"prompt": "a red fox", "chaos": 999})) == "**a red fox** - <@42>"


def test_final_message_shows_notes_as_subtext_lines() -> None:
    done = job(params={"prompt": "a red fox", "notes": ["--tile is not supported by this engine"]})
    # The note is markdown-escaped ("\\-" renders as "-"), so a note can never format the message.
    assert final_content(done) == (
        "**a red fox** - <@42> (fast)\n-# \\--tile is not supported by this engine"
    )
    assert final_content(job()) == "**a red fox** - <@42> (fast)"


def test_notes_are_one_line_escaped_bounded_and_few() -> None:
    lines = note_lines(["two\nlines", "@everyone *look*", "y" * 500, *["more"] * 10])
    assert lines[0] == "-# two lines"
    assert "@\u200beveryone" in lines[1] and "\\*look\\*" in lines[1]
    assert len(lines[2]) < 210 and lines[2].endswith("…")
    assert len(lines) == MAX_NOTES_SHOWN


def test_failure_says_why_and_the_refund() -> None:
    failed = job(error_code=ErrorCode.CONTENT_POLICY.value, error="blocked word", cost=2)
    text = failure_content(failed)
    assert f"❌ {CONTENT_POLICY_MESSAGE}" in text
    assert "Your 2 credits were refunded." in text
    hidden = failure_content(job(error_code=ErrorCode.TIMEOUT.value, error="took 901 s", cost=0))
    assert "took 901" not in hidden and "refunded" not in hidden  # the reason says it all
    assert "failed while making" in failure_content(job(error_code="nonsense"))
    assert "safety filter" in failure_content(job(error_code=ErrorCode.BLOCKED.value))


def test_failure_shows_only_the_fixed_sentence_never_the_workers_text() -> None:
    for code in ErrorCode:
        text = failure_content(job(error_code=code.value, error="/models/sdxl on cuda:0: Traceback", cost=0))
        assert "Traceback" not in text and "cuda" not in text
        assert text == f"**a red fox** - <@42> ❌ {failure_message(code)}"


def test_failure_suggests_openai_only_when_it_is_configured() -> None:
    down = job(error_code=ErrorCode.ENGINE_UNAVAILABLE.value, engine="sdxl")
    assert "--model openai" not in failure_content(down)
    assert "--model openai" in failure_content(down, openai_configured=True)
    assert "--model sdxl" in failure_content(job(error_code=ErrorCode.ENGINE_ERROR.value, engine="openai"))


def test_file_stem_is_safe() -> None:
    assert file_stem(job(prompt="A Fox/../ in *snow*!")) == "a_fox_in_snow_" + "J" * 22
    assert file_stem(job(prompt="???")) == "mirage_" + "J" * 22


# Discord refuses a message whose content is over 2000 characters, and with it the whole delivery.
DISCORD_CONTENT_LIMIT = 2000


def test_a_longest_prompt_fits_every_message_escapes_included() -> None:
    # A 4000-character command: 1500 characters of prompt and 1500 of --no (the parser's limits),
    # every one of them markdown that the line escapes, so each doubles.
    params = {"prompt": "_" * 1500, "negative_prompt": "*" * 1500, "aspect": [3, 2], "speed": "relax"}
    done = job(
        JobKind.VARIATION, params={**params, "strength": 0.9}, seed=4_294_967_000, visibility="stealth"
    )
    notes = {**params, "strength": 0.9, "notes": ["*" * 400] * MAX_NOTES_SHOWN}
    texts = [
        final_content(done),
        final_content(job(JobKind.VARIATION, params=notes, seed=7)),
        waiting_content(done, 12_345),
        progress_content(done, 99),
        failure_content(
            job(error_code=ErrorCode.ENGINE_ERROR.value, params=params, cost=1000), openai_configured=True
        ),
    ]
    for text in texts:
        assert len(text) <= DISCORD_CONTENT_LIMIT, len(text)
    head = job_head(done)
    # Still one bold line (no escape cut in half), the parameters and the member kept.
    assert head.startswith("**\\_") and "…" in head and "--seed 4294967000" in head
    assert head.endswith("** - Variations (Strong) by <@42>")


def test_a_plain_prompt_fallback_is_bounded_after_escaping() -> None:
    # Parameters that no longer validate: the plain prompt is shown, escaped, still bounded.
    head = job_head(job(params={"prompt": "x", "chaos": 999}, prompt="\\" * 3000))
    assert len(head) < 1600 and head.endswith("…** - <@42>")
    shown = head.removeprefix("**").removesuffix("…** - <@42>")
    assert len(shown) % 2 == 0  # whole "\\" pairs: no half escape to swallow the ellipsis or the **
