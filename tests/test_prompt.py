"""The /imagine prompt parser: the classic parameters, their boundaries and their error messages.

Midjourney's newer parameters, multi-prompts, notes and styles are in test_prompt_language.py.
"""

from __future__ import annotations

import unicodedata
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.prompt import (
    KNOWN_PARAMETERS,
    MAX_NEGATIVE_LENGTH,
    MAX_PROMPT_LENGTH,
    PromptError,
    analyse_prompt,
    parse_prompt,
)
from workers.schema import MAX_SEED, Engine, GenerationParams, Sampler, Visibility


def error(text: str) -> PromptError:
    with pytest.raises(PromptError) as caught:
        parse_prompt(text)
    return caught.value


def test_defaults() -> None:
    params = parse_prompt("a red fox in the snow")
    assert params == GenerationParams(prompt="a red fox in the snow")
    assert (params.aspect, params.width, params.height) == ((1, 1), 1024, 1024)
    assert (params.seed, params.chaos, params.stylize, params.quality) == (None, 0, 100, 1.0)
    assert (params.steps, params.sampler, params.tile) == (None, Sampler.DPM, False)
    assert (params.engine, params.visibility, params.negative_prompt) == (None, None, "")


def test_everything_at_once() -> None:
    params = parse_prompt(
        "a cat in a hat --ar 16:9 --seed 7 --no dogs, text --c 20 --s 750 --q .5 --tile "
        "--steps 30 --sampler euler_a --model dalle --stealth"
    )
    assert params.prompt == "a cat in a hat"
    assert (params.aspect, params.width, params.height) == ((16, 9), 1344, 768)
    assert (params.seed, params.chaos, params.stylize, params.quality) == (7, 20, 750, 0.5)
    assert (params.steps, params.sampler, params.tile) == (30, Sampler.EULER_A, True)
    assert (params.engine, params.visibility, params.negative_prompt) == (
        Engine.OPENAI,
        Visibility.STEALTH,
        "dogs, text",
    )


# --- --ar ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ratio", "size"),
    [
        ("1:1", (1024, 1024)),
        ("3:2", (1216, 832)),
        ("16:9", (1344, 768)),
        ("2:3", (832, 1216)),
        ("9:16", (768, 1344)),
        ("4:1", (2048, 512)),
        ("1:4", (512, 2048)),
    ],
)
def test_aspect_maps_to_bucket(ratio: str, size: tuple[int, int]) -> None:
    params = parse_prompt(f"x --ar {ratio}")
    assert (params.width, params.height) == size
    assert params.width % 64 == 0 and params.height % 64 == 0


@pytest.mark.parametrize(
    ("text", "aspect"),
    [
        ("x --aspect 3:2", (3, 2)),
        ("x --ar 32:18", (16, 9)),  # stored reduced
        ("x --ar 16 : 9", (16, 9)),
        ("x --ar 016:009", (16, 9)),
        ("x --ar 16：9", (16, 9)),  # full-width colon from CJK keyboards
        ("x --ar 400:100", (4, 1)),
    ],
)
def test_aspect_spellings(text: str, aspect: tuple[int, int]) -> None:
    assert parse_prompt(text).aspect == aspect


@pytest.mark.parametrize(
    ("ratio", "clamped", "size"),
    [("1:5", (1, 4), (512, 2048)), ("5:1", (4, 1), (2048, 512)), ("10:1", (4, 1), (2048, 512)),
     ("401:100", (4, 1), (2048, 512)), ("1:1000", (1, 4), (512, 2048))],
)  # fmt: skip
def test_aspect_beyond_four_to_one_clamps_with_a_note(
    ratio: str, clamped: tuple[int, int], size: tuple[int, int]
) -> None:
    parsed = analyse_prompt(f"x --ar {ratio}")
    assert parsed.params.aspect == clamped
    assert (parsed.params.width, parsed.params.height) == size
    assert any(f"--ar {ratio}" in note and f"{clamped[0]}:{clamped[1]}" in note for note in parsed.notes)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("0:1", "out of range"),
        ("1:0", "out of range"),
        ("abc", "not valid"),
        ("16x9", "not valid"),
        ("16:", "not valid"),
        (":9", "not valid"),
        ("1.5:1", "not valid"),
        ("-1:1", "not valid"),
        ("1:1:1", "not valid"),
        ("9" * 40 + ":1", "out of range"),
    ],
)
def test_bad_aspect(value: str, problem: str) -> None:
    exc = error(f"x --ar {value}")
    assert exc.parameter == "ar"
    assert exc.value == value
    assert problem in str(exc)
    assert "W:H" in str(exc) and "W:H" in exc.allowed


# --- numbers ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("names", "field", "low", "high"),
    [
        (("seed",), "seed", 0, MAX_SEED),
        (("chaos", "c"), "chaos", 0, 100),
        (("stylize", "s"), "stylize", 0, 1000),
        (("steps",), "steps", 1, 150),
    ],
)
def test_whole_number_ranges(names: tuple[str, ...], field: str, low: int, high: int) -> None:
    for name in names:
        assert getattr(parse_prompt(f"x --{name} {low}"), field) == low
        assert getattr(parse_prompt(f"x --{name} {high}"), field) == high
        for bad in (low - 1, high + 1):
            exc = error(f"x --{name} {bad}")
            assert exc.parameter == field
            assert exc.value == str(bad)
            assert f"from {low} to {high}" in exc.allowed
            assert f"`--{name} {bad}`" in str(exc)
        for junk in ("abc", "1.5", "1e3", "+5", "٣", "1_0", "0x10"):
            exc = error(f"x --{name} {junk}")
            assert exc.parameter == field and "is not valid" in str(exc)


def test_chaos_message_reads_as_a_sentence() -> None:
    assert str(error("x --chaos 150")) == (
        "`--chaos 150` is out of range: chaos must be a whole number from 0 to 100."
    )


def test_huge_numbers_are_out_of_range_not_crashes() -> None:
    assert error("x --seed 99999999999999999999999").parameter == "seed"
    assert "out of range" in str(error("x --seed " + "9" * 5000))
    assert parse_prompt("x --seed 0000000000000000042").seed == 42


@pytest.mark.parametrize(
    ("value", "quality"),
    [
        (".25", 0.25),
        ("0.25", 0.25),
        (".5", 0.5),
        ("0.50", 0.5),
        ("1", 1.0),
        ("1.0", 1.0),
        ("2", 2.0),
        ("2.", 2.0),
        ("4", 4.0),
        ("4.0", 4.0),
    ],
)
def test_quality_values(value: str, quality: float) -> None:
    assert parse_prompt(f"x --quality {value}").quality == quality
    assert parse_prompt(f"x --q {value}").quality == quality


@pytest.mark.parametrize("value", ["0", "0.3", "1.5", "3", "8", ".", "abc", "1/2", "-1"])
def test_bad_quality(value: str) -> None:
    exc = error(f"x --q {value}")
    assert exc.parameter == "quality" and ".25, .5, 1, 2 or 4" in str(exc)


def test_steps_override_quality() -> None:
    params = parse_prompt("x --q 2 --steps 10")
    assert (params.quality, params.steps, params.step_count) == (2.0, 10, 10)
    assert parse_prompt("x --q .5").step_count == 12


# --- choices and flags --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "sampler"),
    [
        ("dpm", Sampler.DPM),
        ("euler", Sampler.EULER),
        ("euler_a", Sampler.EULER_A),
        ("Euler-A", Sampler.EULER_A),
        ("ddim", Sampler.DDIM),
        ("DDPM", Sampler.DDPM),
    ],
)
def test_samplers(value: str, sampler: Sampler) -> None:
    assert parse_prompt(f"x --sampler {value}").sampler == sampler


def test_bad_sampler_lists_the_choices() -> None:
    exc = error("x --sampler heun")
    assert exc.parameter == "sampler"
    assert all(name in str(exc) for name in ("dpm", "euler", "euler_a", "ddim", "ddpm"))


@pytest.mark.parametrize(
    ("value", "engine"),
    [
        ("sdxl", Engine.SDXL),
        ("openai", Engine.OPENAI),
        ("dalle", Engine.OPENAI),
        ("DALL-E", Engine.OPENAI),
        ("gpt-image", Engine.OPENAI),
    ],
)
def test_model(value: str, engine: Engine) -> None:
    assert parse_prompt(f"x --model {value}").engine == engine


def test_bad_model() -> None:
    exc = error("x --model midjourney")
    assert exc.parameter == "model" and "sdxl, openai" in str(exc)


def test_flags() -> None:
    assert parse_prompt("x --tile").tile is True
    assert parse_prompt("x --stealth").visibility == Visibility.STEALTH
    assert parse_prompt("x --public").visibility == Visibility.PUBLIC
    exc = error("x --stealth --public")
    assert "--stealth" in str(exc) and "--public" in str(exc)


def test_flag_with_text_after_it() -> None:
    exc = error("x --tile a seamless pattern")
    assert exc.parameter == "tile" and exc.value == "a seamless pattern"
    assert "takes no value" in str(exc) and "before the parameters" in str(exc)


def test_text_after_a_value_points_at_the_prompt_order() -> None:
    exc = error("--ar 16:9 a cat")
    assert exc.parameter == "ar" and "before the parameters" in str(exc)


# --- --no ---------------------------------------------------------------------------------------


def test_negative_prompt_runs_to_the_next_parameter_and_merges() -> None:
    params = parse_prompt("a castle --no people, cars --ar 3:2 —no  text,\twatermark")
    assert params.negative_prompt == "people, cars, text, watermark"
    assert params.aspect == (3, 2)


def test_negative_prompt_needs_a_value_and_has_a_limit() -> None:
    assert error("x --no").parameter == "no"
    assert error("x --no --tile").parameter == "no"
    assert len(parse_prompt("x --no " + "a" * MAX_NEGATIVE_LENGTH).negative_prompt) == MAX_NEGATIVE_LENGTH
    assert error("x --no " + "a" * MAX_NEGATIVE_LENGTH + " --no b").parameter == "no"


# --- dashes, names, structure -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "a fox --ar 3:2 --seed 5",
        "a fox —ar 3:2 —seed 5",  # em dash, as phones write it
        "a fox –ar 3:2 –seed 5",  # en dash
        "a fox —-ar 3:2 ---seed 5",
        "a fox --AR 3:2 --Seed 5",
        "a fox --aspect 3:2 --seed 5",
        "  a   fox\n--ar\t3:2   --seed   5  ",
    ],
)
def test_dash_and_case_variants(text: str) -> None:
    params = parse_prompt(text)
    assert (params.prompt, params.aspect, params.seed) == ("a fox", (3, 2), 5)


@pytest.mark.parametrize(
    "text",
    [
        "a cat—dog hybrid",  # a dash inside a word is punctuation
        "rain — no umbrella",  # dash, space, word: prose, not a parameter
        "count down -- 3 2 1",  # a bare -- is not a parameter
        "arrows --> and <--",
        "a-b-c - d",
    ],
)
def test_dashes_in_prose_stay_in_the_prompt(text: str) -> None:
    params = parse_prompt(text)
    assert params.prompt == " ".join(text.split())
    assert params.negative_prompt == ""
    assert params.model_prompt == params.prompt


@pytest.mark.parametrize(
    ("text", "parameter", "fixed"),
    [
        ("a cat--ar 16:9", "ar", "cat --ar 16:9"),
        ("a cat—ar 16:9 --seed 5", "ar", "cat --ar 16:9"),  # a phone's "--" glued to the word
        ("a cat--tile", "tile", "cat --tile"),
        ("a castle --no people--ar 3:2", "ar", "people --ar 3:2"),  # inside --no, too
    ],
)
def test_parameter_glued_to_a_word_is_reported_not_dropped(text: str, parameter: str, fixed: str) -> None:
    # Read as prose, "--ar 16:9" would land in the prompt and a 1:1 image be made (and charged).
    exc = error(text)
    assert exc.parameter == parameter and "no space before" in str(exc) and f"`{fixed}`" in str(exc)


@pytest.mark.parametrize(
    "text",
    [
        "rain—no umbrella",  # --no takes any text: a glued "no" stays prose
        "a man—stop sign",  # not a valid --stop value
        "wild—chaos everywhere",
        "fire--raw power",
    ],
)
def test_glued_words_that_are_not_valid_parameters_stay_prose(text: str) -> None:
    assert parse_prompt(text).prompt == text


@pytest.mark.parametrize(
    ("text", "field", "value"),
    [
        ("a cat --ar 16:9 --", "aspect", (16, 9)),
        ("a cat --no dogs —", "negative_prompt", "dogs"),
        ("a cat --p abc --", "personalize", ("abc",)),
        ("a cat --tile —-", "tile", True),
    ],
)
def test_trailing_dashes_after_the_parameters_are_named(text: str, field: str, value: Any) -> None:
    exc = error(text)
    assert len(exc.problems) == 1 and "without a parameter name" in str(exc)
    assert "more than one value" not in str(exc) and "takes no value" not in str(exc)
    marker = text.split()[-1]
    assert getattr(parse_prompt(text[: -len(marker)]), field) == value


def test_unknown_parameter_names_it_and_lists_the_known_ones() -> None:
    exc = error("x --zork 3")
    assert exc.parameter == "zork" and exc.value == "3"
    assert "`--zork` is not a known parameter" in str(exc)
    for known in ("--ar", "--chaos", "--stylize", "--weird", "--sref", "--steps", "--model"):
        assert known in str(exc)
    assert set(exc.allowed.split(", ")) == set(KNOWN_PARAMETERS)
    assert error("x --ar16:9").parameter == "ar16:9"


@pytest.mark.parametrize(
    ("text", "parameter"),
    [
        ("x --seed 1 --seed 2", "seed"),
        ("x --c 1 --chaos 2", "chaos"),
        ("x --ar 1:1 --aspect 2:3", "ar"),
        ("x --tile --tile", "tile"),
        ("x --stealth —stealth", "stealth"),
        ("x --q 1 --quality 2", "quality"),
    ],
)
def test_duplicates(text: str, parameter: str) -> None:
    exc = error(text)
    assert exc.parameter == parameter and "use it once" in str(exc)


@pytest.mark.parametrize(
    "name", ["ar", "seed", "chaos", "c", "stylize", "s", "quality", "q", "steps", "sampler", "model"]
)
def test_missing_values(name: str) -> None:
    exc = error(f"x --{name}")
    assert exc.value is None and "needs a value" in str(exc)
    assert error(f"x --{name} --tile").value is None


@pytest.mark.parametrize("text", ["", "   ", "--ar 3:2", " —seed 4", "\n\t"])
def test_empty_prompt(text: str) -> None:
    exc = error(text)
    assert exc.parameter == "prompt" and "empty" in str(exc)


def test_prompt_length_limit() -> None:
    assert len(parse_prompt("a" * MAX_PROMPT_LENGTH).prompt) == MAX_PROMPT_LENGTH
    exc = error("a" * (MAX_PROMPT_LENGTH + 1) + " --ar 1:1")
    assert exc.parameter == "prompt" and str(MAX_PROMPT_LENGTH) in str(exc)


def test_text_is_cleaned_for_storage() -> None:
    params = parse_prompt("a\x00cat\x1b[31m \ud800 dog --no red\x07")
    assert params.prompt == "a cat [31m dog"
    assert params.negative_prompt == "red"


def test_shown_values_cannot_break_discord_markdown() -> None:
    message = str(error("x --chaos `lots` " + "y" * 200))
    assert "`lots`" not in message and "'lots'" in message
    assert len(message) < 300


# --- properties ---------------------------------------------------------------------------------

FRAGMENTS = st.sampled_from(
    [
        "--ar", "--aspect", "—ar", "–", "—", "--", "-", ":", "::", " ", "  ", "\n", "--no", "—no", ",",
        "--seed", "--c", "--s", "--q", "--tile", "--steps", "--sampler", "--model", "--stealth",
        "--public", "--AR", "cat", "a red fox", "16", "9", "0", "4294967296", ".25", "1.0", "dpm",
        "dalle", "`", "\x00", "٣", "--x", "euler-a", "9" * 30,
    ]
)  # fmt: skip
FRAGMENT_TEXT = st.lists(st.one_of(FRAGMENTS, st.text(max_size=4)), max_size=24).map("".join)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=200), FRAGMENT_TEXT))
def test_any_text_parses_or_raises_prompt_error(text: str) -> None:
    try:
        params = parse_prompt(text)
    except PromptError as exc:
        assert str(exc) and isinstance(exc.parameter, str)
        return
    assert isinstance(params, GenerationParams)
    assert params.prompt and params.prompt == params.prompt.strip()
    assert len(params.prompt) <= MAX_PROMPT_LENGTH
    GenerationParams.model_validate(params.model_dump(mode="json"))  # crosses the broker intact


OPTIONAL = {
    "seed": st.integers(0, MAX_SEED),
    "chaos": st.integers(0, 100),
    "stylize": st.integers(0, 1000),
    "steps": st.integers(1, 150),
    "quality": st.sampled_from([0.25, 0.5, 1.0, 2.0, 4.0]),
    "sampler": st.sampled_from(list(Sampler)),
    "engine": st.sampled_from(list(Engine)),
    "visibility": st.sampled_from(list(Visibility)),
    "tile": st.booleans(),
    "aspect": st.tuples(st.integers(1, 64), st.integers(1, 64)).filter(lambda r: max(r) <= 4 * min(r)),
}


@settings(max_examples=200, deadline=None)
@given(
    prompt=st.text(st.characters(categories=["L", "N"]), min_size=1, max_size=40),
    chosen=st.fixed_dictionaries({}, optional=OPTIONAL),
    dash=st.sampled_from(["--", "—", "–"]),
)
def test_valid_parameters_round_trip(prompt: str, chosen: dict[str, Any], dash: str) -> None:
    parts = [prompt]
    for field, value in chosen.items():
        if field == "aspect":
            parts.append(f"{dash}ar {value[0]}:{value[1]}")
        elif field == "engine":
            parts.append(f"{dash}model {value}")
        elif field == "visibility":
            parts.append(f"{dash}{value}")
        elif field == "tile":
            parts.append(f"{dash}tile" if value else "")
        else:
            parts.append(f"{dash}{field} {value}")
    params = parse_prompt(" ".join(parts))
    assert params.prompt == unicodedata.normalize("NFKC", prompt)  # "Ĳ" is read as "IJ"
    for field, value in chosen.items():
        if field == "aspect":
            assert params.aspect[0] * value[1] == params.aspect[1] * value[0]
        else:
            assert getattr(params, field) == value
