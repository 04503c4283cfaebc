"""Midjourney's whole prompt language: newer parameters, notes, all-problems messages, did-you-mean,
normalisation, image prompts, multi-prompts, style presets and the parameter line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.prompt import (
    PromptError,
    analyse_prompt,
    parameter_line,
    parse_prompt,
    plan_prompts,
    prompt_text,
)
from bot.styles import StyleConfigError, apply_style, choose_preset, load_presets, shipped_presets
from workers.schema import (
    MAX_SEED,
    Engine,
    GenerationParams,
    PromptPart,
    Sampler,
    Visibility,
    stylize_guidance,
)

DASHES = ["--", "—", "–"]


def error(text: str) -> PromptError:
    with pytest.raises(PromptError) as caught:
        parse_prompt(text)
    return caught.value


def notes(text: str) -> tuple[str, ...]:
    return analyse_prompt(text).notes


# --- every parameter, every dash form -----------------------------------------------------------


@pytest.mark.parametrize("dash", DASHES)
@pytest.mark.parametrize(
    ("written", "field", "value"),
    [
        ("stop 50", "stop", 50),
        ("weird 250", "weird", 250),
        ("w 3000", "weird", 3000),
        ("iw 1.5", "image_weight", 1.5),
        ("iw .25", "image_weight", 0.25),
        ("niji", "model_profile", "niji 6"),
        ("niji 5", "model_profile", "niji 5"),
        ("v 7", "model_profile", "7"),
        ("version 6.1", "model_profile", "6.1"),
        ("v 5.2", "model_profile", "5.2"),
        ("v 5.0", "model_profile", "5"),
        ("fast", "speed", "fast"),
        ("relax", "speed", "relax"),
        ("turbo", "speed", "turbo"),
        ("draft", "draft", True),
        ("raw", "raw", True),
        ("style raw", "raw", True),
        ("style cinematic", "style", "cinematic"),
        ("style Anime", "style", "anime"),
        ("exp 25", "experimental", 25),
        ("sref random", "style_refs", ("random",)),
        ("sref 1234567 https://e.com/s.png", "style_refs", ("1234567", "https://e.com/s.png")),
        ("sref https://e.com/a.png::2", "style_refs", ("https://e.com/a.png::2",)),
        ("sw 400", "style_weight", 400),
        ("sv 4", "style_version", 4),
        ("cref https://e.com/c.png https://e.com/d.png", "character_refs", ("https://e.com/c.png", "https://e.com/d.png")),
        ("cw 0", "character_weight", 0),
        ("oref https://e.com/o.png", "omni_ref", "https://e.com/o.png"),
        ("ow 1000", "omni_weight", 1000),
        ("p", "personalize", ()),
        ("profile ab12 cd34", "personalize", ("ab12", "cd34")),
        ("personalize xyz", "personalize", ("xyz",)),
        ("q 4", "quality", 4.0),
        ("model openai", "engine", Engine.OPENAI),
        ("model gpt-image", "engine", Engine.OPENAI),
        ("model dall-e", "engine", Engine.OPENAI),
    ],
)  # fmt: skip
def test_parameter_sets_its_field(dash: str, written: str, field: str, value: Any) -> None:
    assert getattr(parse_prompt(f"a lighthouse {dash}{written}"), field) == value


def test_repeat_and_its_alias() -> None:
    assert analyse_prompt("x --repeat 5").repeat == 5
    assert analyse_prompt("x —r 40").repeat == 40


@pytest.mark.parametrize(
    ("names", "field", "low", "high"),
    [
        (("stop",), "stop", 10, 100),
        (("weird", "w"), "weird", 0, 3000),
        (("exp",), "experimental", 0, 100),
        (("sw",), "style_weight", 0, 1000),
        (("sv",), "style_version", 1, 6),
        (("cw",), "character_weight", 0, 100),
        (("ow",), "omni_weight", 1, 1000),
        (("repeat", "r"), None, 1, 40),
    ],
)
def test_new_whole_number_ranges(names: tuple[str, ...], field: str | None, low: int, high: int) -> None:
    for name in names:
        for good in (low, high):
            parsed = analyse_prompt(f"x --{name} {good}")
            assert (getattr(parsed.params, field) if field else parsed.repeat) == good
        for bad in (low - 1, high + 1):
            if bad < 0:
                continue
            exc = error(f"x --{name} {bad}")
            assert f"`--{name} {bad}` is out of range" in str(exc)
            assert f"from {low} to {high}" in exc.allowed
        assert "is not valid" in str(error(f"x --{name} lots"))


@pytest.mark.parametrize("value", ["-1", "3.5", "4", "abc"])
def test_bad_image_weight(value: str) -> None:
    exc = error(f"x --iw {value}")
    assert exc.parameter == "iw" and "from 0 to 3" in str(exc)


@pytest.mark.parametrize("value", ["6.5", "8", "0", "5.3", "latest"])
def test_bad_version_lists_the_versions(value: str) -> None:
    exc = error(f"x --v {value}")
    assert exc.parameter == "version" and "5.2" in exc.allowed and "6.1" in exc.allowed and "7" in exc.allowed


def test_bad_niji() -> None:
    exc = error("x --niji 4")
    assert exc.parameter == "niji" and "5 or 6" in str(exc)


@pytest.mark.parametrize(
    ("text", "parameter"),
    [
        ("x --sref nope!", "sref"),
        ("x --sref ftp://e.com/a.png", "sref"),
        ("x --cref 12345", "cref"),
        ("x --oref https://e.com/a.png https://e.com/b.png", "oref"),
        ("x --p bad!code", "p"),
        ("x --sref 123::--1", "sref"),
    ],
)
def test_bad_references(text: str, parameter: str) -> None:
    assert error(text).parameter == parameter


def test_references_need_a_value_and_are_bounded() -> None:
    assert "needs a value" in str(error("x --sref"))
    assert "needs a value" in str(error("x --cref"))
    assert "limit is 10" in str(error("x --sref " + " ".join(str(n) for n in range(11))))


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("x --fast --turbo", ("--fast", "--turbo")),
        ("x --v 7 --niji", ("--v", "--niji")),
        ("x --raw --style cinematic", ("--raw", "--style cinematic")),
        ("x --stealth --public", ("--stealth", "--public")),
    ],
)
def test_contradictions_are_refused(text: str, words: tuple[str, ...]) -> None:
    message = str(error(text))
    assert all(word in message for word in words)


def test_style_raw_and_raw_flag_agree() -> None:
    assert parse_prompt("x --style raw --raw").raw is True


# --- video and legacy ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["video", "motion high", "loop", "end https://e.com/x.png", "bs 2"])
def test_video_parameters_say_video_is_not_supported(name: str) -> None:
    message = str(error(f"a wave --{name}"))
    assert "video is not supported" in message and "not a known parameter" not in message


@pytest.mark.parametrize("name", ["hd", "test", "testp", "creative", "upbeta"])
def test_legacy_parameters_are_ignored_with_a_note(name: str) -> None:
    parsed = analyse_prompt(f"x --{name}")
    assert parsed.params == GenerationParams(prompt="x")
    assert any(f"--{name}" in note and "ignored" in note for note in parsed.notes)


# --- notes for parameters without an equivalent -------------------------------------------------


@pytest.mark.parametrize("text", ["x --exp 50", "x --p", "x --profile abc", "x --sv 4"])
def test_parameters_without_an_equivalent_are_accepted_with_a_note(text: str) -> None:
    parsed = analyse_prompt(text)
    name = text.split()[1]
    assert len(parsed.notes) == 1 and name in parsed.notes[0] and "ignored" in parsed.notes[0]


@pytest.mark.parametrize(
    ("text", "needs"),
    [("x --sw 100", "--sref"), ("x --cw 50", "--cref"), ("x --ow 50", "--oref"), ("x --iw 2", "image URL")],
)
def test_weights_without_their_reference_get_a_note(text: str, needs: str) -> None:
    assert any(needs in note for note in notes(text))


def test_plain_prompts_have_no_notes() -> None:
    assert notes("a lighthouse at dusk --ar 3:2 --s 250 --v 7 --sref random --sw 100") == ()


# --- all problems in one message, did you mean --------------------------------------------------


def test_every_problem_is_in_one_message() -> None:
    exc = error("x --stylise 5 --chaos 500 --zork --q 3 --ar 16/9")
    assert len(exc.problems) == 5
    message = str(exc)
    assert message.startswith("This prompt has 5 problems:")
    for expected in ("--stylise", "--chaos 500", "--zork", "--q 3", "--ar 16/9"):
        assert expected in message
    assert all(problem.allowed for problem in exc.problems)
    assert exc.parameter == exc.problems[0].parameter == "stylise"
    assert "from 0 to 100" in message and ".25, .5, 1, 2 or 4" in message


def test_one_problem_reads_as_one_sentence() -> None:
    exc = error("x --chaos 150")
    assert str(exc) == "`--chaos 150` is out of range: chaos must be a whole number from 0 to 100."
    assert len(exc.problems) == 1


def test_long_lists_of_problems_stay_under_discords_limit() -> None:
    exc = error("x " + " ".join(f"--zork{n} 1" for n in range(200)))
    assert len(exc.problems) == 200
    assert len(str(exc)) < 2000 and "more." in str(exc)


@pytest.mark.parametrize(
    ("text", "suggestion"),
    [
        ("x --stylise 500", "`--stylize`"),
        ("x --aspekt 3:2", "`--aspect`"),
        ("x --seeed 4", "`--seed`"),
        ("x --ar 16/9", "`--ar 16:9`"),
        ("x --ar 16x9", "`--ar 16:9`"),
        ("x --ar 16 9", "`--ar 16:9`"),
        ("x --ar16:9", "`--ar 16:9`"),
        ("x --v6.1", "`--v 6.1`"),
        ("x --s750", "`--s 750`"),
        ("x -- ar 16:9", "`--ar`"),
        ("x — stylize 100", "`--stylize`"),
        ("x --style cinematik", "`--style cinematic`"),
        ("x --seed=5", "`--seed 5`"),  # the command-line habit
        ("x --ar=16:9", "`--ar 16:9`"),
    ],
)
def test_did_you_mean(text: str, suggestion: str) -> None:
    message = str(error(text))
    assert f"did you mean {suggestion.lower()}" in message.lower()


def test_unknown_without_a_close_match_lists_the_parameters() -> None:
    message = str(error("x --qwertyuiop"))
    assert "did you mean" not in message.lower() and "--stylize" in message and "--sref" in message


def test_unknown_style_lists_the_available_ones() -> None:
    exc = error("x --style vaporwave")
    assert exc.parameter == "style"
    for name in ("raw", *shipped_presets()):
        assert name in exc.allowed and name in str(exc)


# --- normalisation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "a fox\u200b--ar 3:2",  # zero-width space as the only separator
        "a fox \u200b--ar 3:2",
        "a fox --\u200bar 3:2",
        "a fox \u202e--ar 3:2\u202c",  # bidi override
        "a fox \ufeff—ar 3:2",
        "a fox ——ar 3:2",
        "ａ ｆｏｘ －－ａｒ　３：２",  # full-width forms from CJK keyboards
        "a fox\u00a0--ar\u00a03:2",  # no-break spaces
    ],
)
def test_invisible_and_compatibility_characters_do_not_hide_parameters(text: str) -> None:
    params = parse_prompt(text)
    assert (params.prompt, params.aspect) == ("a fox", (3, 2))


def test_emoji_sequences_survive() -> None:
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"
    assert parse_prompt(f"{family} on a beach").prompt == f"{family} on a beach"


# --- image prompts ------------------------------------------------------------------------------


def test_leading_image_urls_are_image_prompts() -> None:
    params = parse_prompt("https://e.com/a.png <https://e.com/b.jpg> a castle --iw 2")
    assert params.image_prompts == ("https://e.com/a.png", "https://e.com/b.jpg")
    assert params.prompt == params.model_prompt == "a castle"
    assert params.image_weight == 2.0


def test_two_images_need_no_text_but_one_does() -> None:
    assert parse_prompt("https://e.com/a.png https://e.com/b.png").prompt == ""
    exc = error("https://e.com/a.png --ar 3:2")
    assert exc.parameter == "prompt" and "second image" in str(exc)


def test_image_prompts_are_bounded() -> None:
    # Every link is downloaded before the job is accepted: the count is capped like --sref's.
    ten = " ".join(f"https://e.com/{n}.png" for n in range(10))
    assert len(parse_prompt(ten).image_prompts) == 10
    exc = error(ten + " https://e.com/10.png a castle")
    assert exc.parameter == "prompt" and "11 image URLs" in str(exc) and "limit is 10" in str(exc)


def test_a_comma_after_an_image_url_is_not_part_of_the_link() -> None:
    params = parse_prompt("https://e.com/a.png, <https://e.com/b.png>, a castle")
    assert params.image_prompts == ("https://e.com/a.png", "https://e.com/b.png")
    assert params.prompt == "a castle"


def test_urls_after_the_text_are_words() -> None:
    params = parse_prompt("a poster like https://e.com/a.png")
    assert params.image_prompts == () and params.prompt == "a poster like https://e.com/a.png"


# --- multi-prompts ------------------------------------------------------------------------------


def weights(params: GenerationParams) -> list[tuple[str, float]]:
    return [(part.text, round(part.weight, 6)) for part in params.parts]


def test_multiprompt_weights_are_normalised() -> None:
    params = parse_prompt("space::2 ship::1 --ar 16:9")
    assert weights(params) == [("space", 0.666667), ("ship", 0.333333)]
    assert weights(parse_prompt("space::4 ship::2")) == weights(params)
    assert params.prompt == "space::2 ship::1"  # what the member wrote
    assert params.model_prompt == "space, ship"


def test_trailing_separator_and_default_weight() -> None:
    assert weights(parse_prompt("hot dog::")) == [("hot dog", 1.0)]
    assert weights(parse_prompt("hot:: dog")) == [("hot", 0.5), ("dog", 0.5)]
    assert weights(parse_prompt("a::3 b")) == [("a", 0.75), ("b", 0.25)]


def test_negative_weights_go_to_the_negative_side() -> None:
    params = parse_prompt("still life painting:: fruit::-.5 --no frames")
    assert weights(params) == [("still life painting", 1.0), ("fruit", -0.5)]
    assert params.model_prompt == "still life painting"
    assert params.model_negative == "frames, fruit"


def test_weights_must_add_up_to_more_than_zero() -> None:
    exc = error("fruit::-1 apples::0.5")
    assert exc.parameter == "prompt" and "more than 0" in str(exc)
    assert "from -1000 to 1000" in str(error("a::5000 b"))


def test_zero_weight_parts_are_dropped() -> None:
    assert weights(parse_prompt("a::0 b::1")) == [("b", 1.0)]


def test_colons_inside_a_link_are_not_multiprompt_separators() -> None:
    params = parse_prompt("a poster like https://e.com/w/a::0/b.png")  # "::0" would drop the text
    assert params.parts == () and params.model_prompt == params.prompt
    assert weights(parse_prompt("fox::3 like https://e.com/a::b.png")) == [
        ("fox", 0.75),
        ("like https://e.com/a::b.png", 0.25),
    ]


def test_emphasis_is_parsed_into_token_weights() -> None:
    params = parse_prompt("a (red:1.3) fox in (deep snow:0.8)")
    (part,) = params.parts
    assert part.text == params.model_prompt == "a red fox in deep snow"
    assert part.emphasis == (("a ", 1.0), ("red", 1.3), (" fox in ", 1.0), ("deep snow", 0.8))
    assert "".join(piece for piece, _ in part.emphasis) == part.text
    assert "from 0 to 3" in str(error("a (red:9) fox"))


def test_plain_prompts_have_no_parts_and_parentheses_stay() -> None:
    params = parse_prompt("a cat (fluffy) on a mat")
    assert params.parts == () and params.model_prompt == "a cat (fluffy) on a mat"


# --- style presets ------------------------------------------------------------------------------


def test_shipped_presets() -> None:
    presets = shipped_presets()
    assert {"cinematic", "anime", "photographic", "watercolor"} <= set(presets)
    assert all("{prompt}" in preset.prompt for preset in presets.values())


def test_owner_folder_adds_and_overrides(tmp_path: Path) -> None:
    (tmp_path / "noir.toml").write_text('prompt = "film noir still of {prompt}"\nnegative = "colour"\n')
    (tmp_path / "anime.toml").write_text('prompt = "house anime {prompt}"\n')
    presets = load_presets([tmp_path])
    assert presets["noir"].negative == "colour"
    assert presets["anime"].prompt == "house anime {prompt}"
    assert parse_prompt("x --style noir", styles=presets).style == "noir"
    with pytest.raises(PromptError) as caught:
        parse_prompt("x --style noirr", styles=presets)
    assert "noir" in caught.value.allowed and "`--style noir`" in str(caught.value)
    with pytest.raises(PromptError) as caught:
        parse_prompt("x --style noir")  # the shipped presets alone do not have it
    assert "noir" not in caught.value.allowed


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("bad.toml", 'prompt = "no placeholder"', "{prompt}"),
        ("bad.toml", 'prompt = "{prompt}"\nextra = 1', "unknown keys"),
        ("bad.toml", 'prompt = "{prompt}"\nguidance_delta = 50', "guidance_delta"),
        ("bad.toml", "prompt = ", "cannot read"),
        ("raw.toml", 'prompt = "{prompt}"', "raw"),
        ("Bad Name.toml", 'prompt = "{prompt}"', "file name"),
    ],
)
def test_bad_preset_files_name_the_file_and_the_problem(
    tmp_path: Path, name: str, content: str, problem: str
) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(StyleConfigError) as caught:
        load_presets([tmp_path])
    assert name in str(caught.value) and problem in str(caught.value)


def test_missing_owner_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(StyleConfigError, match="does not exist"):
        load_presets([tmp_path / "nope"])


def test_apply_style_templates_every_positive_part() -> None:
    preset = shipped_presets()["cinematic"]
    params = apply_style(parse_prompt("castle::3 fog::1 people::-1 --no text --style cinematic"), preset)
    before, after = preset.prompt.split("{prompt}")
    positive = [part for part in params.parts if part.weight > 0]
    assert [part.text for part in positive] == [before + "castle" + after, before + "fog" + after]
    assert [part.weight for part in positive] == [0.75, 0.25]
    assert params.model_negative == f"text, people, {preset.negative}"
    assert params.prompt == "castle::3 fog::1 people::-1" and params.negative_prompt == "text"
    assert params.guidance_scale == pytest.approx(stylize_guidance(100) + preset.guidance_delta)


def test_apply_style_keeps_emphasis_aligned() -> None:
    preset = shipped_presets()["watercolor"]
    styled = apply_style(parse_prompt("a (red:1.2) fox"), preset)
    (part,) = [part for part in styled.parts if part.weight > 0]
    assert "".join(piece for piece, _ in part.emphasis) == part.text
    assert ("red", 1.2) in part.emphasis


def test_choose_preset_house_style_and_raw() -> None:
    presets = shipped_presets()
    assert choose_preset(parse_prompt("x"), presets) is None
    assert choose_preset(parse_prompt("x"), presets, house_style="photographic") is presets["photographic"]
    assert choose_preset(parse_prompt("x --raw"), presets, house_style="photographic") is None
    assert (
        choose_preset(parse_prompt("x --style anime"), presets, house_style="photographic")
        is presets["anime"]
    )
    assert apply_style(parse_prompt("x"), None) == parse_prompt("x")


# --- parameter line -----------------------------------------------------------------------------


def test_parameter_line_shows_what_differs_and_the_seed() -> None:
    params = parse_prompt("a red fox —ar 3:2 --s 250 --q 1 --c 0")
    assert parameter_line(params, seed=7) == "**a red fox --ar 3:2 --seed 7 --stylize 250**"
    assert parameter_line(parse_prompt("a red fox")) == "**a red fox**"


def test_parameter_line_escapes_markdown_but_not_links() -> None:
    params = parse_prompt("https://e.com/a_b.png https://e.com/c.png *bold* _x_ --no ~~y~~")
    assert parameter_line(params) == (
        r"**<https://e.com/a_b.png> <https://e.com/c.png> \*bold\* \_x\_ --no \~\~y\~\~**"
    )


def test_parameter_line_never_makes_a_masked_link() -> None:
    # The bot's message would show "click here" linking to a site the member chose.
    line = parameter_line(parse_prompt("[click here](https://evil.example/login) a cat"))
    assert line == r"**\[click here](https://evil.example/login) a cat**"


def test_prompt_text_names_everything() -> None:
    text = (
        "https://e.com/a.png a::2 b --no c --ar 2:1 --chaos 5 --quality .5 --seed 9 --stop 80 "
        "--style anime --stylize 10 --weird 3 --iw 2 --tile --niji 5 --sref random --sw 5 --sv 2 "
        "--cref https://e.com/c.png --cw 5 --oref https://e.com/o.png --ow 5 --exp 5 --p x1 "
        "--draft --relax --steps 20 --sampler euler --model sdxl --stealth"
    )
    params = parse_prompt(text)
    assert prompt_text(params) == text.replace("https://e.com/a.png", "<https://e.com/a.png>", 1)


ROUND_TRIP = {
    "negative_prompt": st.sampled_from(["text", "blurry, watermark"]),
    "aspect": st.sampled_from([(3, 2), (16, 9), (1, 4)]),
    "seed": st.integers(0, MAX_SEED),
    "chaos": st.integers(0, 100),
    "stylize": st.integers(0, 1000),
    "quality": st.sampled_from([0.25, 0.5, 2.0, 4.0]),
    "stop": st.integers(10, 100),
    "weird": st.integers(0, 3000),
    "image_weight": st.sampled_from([0.0, 0.5, 1.75, 3.0]),
    "model_profile": st.sampled_from(["5.2", "6", "6.1", "7", "niji 5", "niji 6"]),
    "speed": st.sampled_from(["fast", "relax", "turbo"]),
    "style": st.sampled_from(["cinematic", "anime"]),
    "tile": st.booleans(),
    "draft": st.booleans(),
    "experimental": st.integers(0, 100),
    "style_refs": st.sampled_from([("random",), ("123", "https://e.com/s.png")]),
    "style_weight": st.integers(0, 1000),
    "character_refs": st.just(("https://e.com/c.png",)),
    "character_weight": st.integers(0, 100),
    "omni_ref": st.just("https://e.com/o.png"),
    "omni_weight": st.integers(1, 1000),
    "personalize": st.sampled_from([(), ("abc",)]),
    "steps": st.integers(1, 150),
    "sampler": st.sampled_from(list(Sampler)),
    "engine": st.sampled_from(list(Engine)),
    "visibility": st.sampled_from(list(Visibility)),
}


@settings(max_examples=150, deadline=None)
@given(chosen=st.fixed_dictionaries({}, optional=ROUND_TRIP))
def test_prompt_text_parses_back_to_the_same_params(chosen: dict[str, Any]) -> None:
    from workers.schema import nearest_bucket

    if "aspect" in chosen:
        chosen["width"], chosen["height"] = nearest_bucket(*chosen["aspect"])
    params = GenerationParams(prompt="a lighthouse", **chosen)
    assert parse_prompt(prompt_text(params)) == params


# --- the grammar, as a property -----------------------------------------------------------------

WORD = st.sampled_from(
    ["a", "red", "fox", "castle", "in", "the", "snow", "neon", "city", "über", "東京", "🦊"]
)
PHRASE = st.lists(WORD, min_size=1, max_size=4).map(" ".join)
WEIGHT = st.sampled_from(["", "2", "1.5", ".5", "-.5", "0.25", "3"])
VALUE_PARAMS = st.sampled_from(
    [
        "ar 16:9", "aspect 2:3", "ar 21:9", "ar 1:7", "chaos 40", "c 0", "q .5", "quality 4", "seed 42",
        "stop 30", "stylize 600", "s 0", "weird 900", "w 10", "v 6.1", "version 7", "niji", "niji 5",
        "exp 15", "sref random", "sref 987654 https://e.com/s.png", "sw 300", "sv 4",
        "cref https://e.com/c.png", "cw 40", "oref https://e.com/o.png", "ow 200", "p", "p abc123",
        "profile q1w2", "no text, frames", "no blur", "tile", "raw", "style raw", "style cinematic", "draft",
        "fast", "steps 30", "sampler ddim", "model openai", "iw 1.25", "stealth", "hd",
    ]
)  # fmt: skip


# Aliases of one parameter: a prompt gives each parameter once.
SAME = {
    "aspect": "ar",
    "c": "chaos",
    "q": "quality",
    "s": "stylize",
    "w": "weird",
    "version": "v",
    "profile": "p",
}


@st.composite
def midjourney_prompts(draw: st.DrawFn) -> str:
    """A prompt written in Midjourney's documented grammar (with Mirage's own parameters)."""
    words: list[str] = []
    images = draw(st.lists(st.sampled_from(["https://e.com/a.png", "<https://e.com/b.jpg>"]), max_size=2))
    words += images
    parts = draw(st.lists(st.tuples(PHRASE, WEIGHT), min_size=1, max_size=3))
    if len(parts) == 1 and draw(st.booleans()):
        words.append(parts[0][0])
    else:
        # Midjourney needs the positive weights to outweigh the negative ones: lead with a strong one.
        words += [f"{parts[0][0]}::4"] + [f"{text}::{weight}" for text, weight in parts[1:]]
    if draw(st.booleans()):
        words.insert(len(images), f"{{{draw(PHRASE)}, {draw(PHRASE)}}}")
    if draw(st.booleans()):
        words.append(f"({draw(PHRASE)}:{draw(st.sampled_from(['1.3', '0.7', '2']))})")
    chosen = draw(
        st.lists(VALUE_PARAMS, max_size=6, unique_by=lambda p: SAME.get(p.split()[0], p.split()[0]))
    )
    for param in chosen:
        if param in ("fast",):
            words.append(draw(st.sampled_from(["--fast", "--relax", "--turbo"])))
            continue
        if param.startswith("ar ") and draw(st.booleans()):
            param = "ar {1:1, 3:2}"
        words.append(draw(st.sampled_from(DASHES)) + param)
    if draw(st.booleans()):
        words.append(f"--repeat {draw(st.integers(1, 3))}")
    return " ".join(words)


def conflicting(text: str) -> bool:
    """Combinations Midjourney itself refuses: two models, or raw together with a named style."""
    has = {name: any(f"{dash}{name}" in text for dash in DASHES) for name in ("v ", "version", "niji", "raw")}
    model_clash = (has["v "] or has["version"]) and has["niji"]
    style_clash = has["raw"] and "style cinematic" in text
    return model_clash or style_clash


@settings(max_examples=300, deadline=None)
@given(midjourney_prompts())
def test_midjourney_grammar_leaves_no_syntax_in_the_model_prompt(text: str) -> None:
    if conflicting(text):
        with pytest.raises(PromptError):
            plan_prompts(text)
        return
    plan = plan_prompts(text)
    assert 1 <= plan.count <= 12
    for params in plan.params:
        for model_text in (params.model_prompt, params.model_negative, *(p.text for p in params.parts)):
            for syntax in ("--", "—", "–", "::", "{", "}"):
                assert syntax not in model_text, (syntax, model_text, text)
        assert all(0 < abs(part.weight) <= 1 for part in params.parts)
        assert (
            sum(part.weight for part in params.parts if part.weight > 0) == pytest.approx(1.0)
            or not params.parts
        )
        assert GenerationParams.model_validate(params.model_dump(mode="json")) == params


def test_old_messages_without_the_new_fields_still_validate() -> None:
    old = {"prompt": "a fox", "negative_prompt": "", "aspect": [3, 2], "width": 1216, "height": 832,
           "seed": 5, "chaos": 0, "stylize": 100, "quality": 1.0, "steps": None, "sampler": "dpm",
           "tile": False, "engine": "dalle", "visibility": None}  # fmt: skip
    params = GenerationParams.model_validate(old)
    assert params.parts == () and params.model_prompt == "a fox" and params.model_negative == ""
    assert params.engine == Engine.OPENAI and params.stop == 100 and params.model_profile is None
    assert params.guidance_scale == stylize_guidance(100)


def test_parts_survive_the_broker() -> None:
    params = parse_prompt("a (red:1.3) fox::2 snow::-1")
    assert GenerationParams.model_validate(params.model_dump(mode="json")) == params
    assert params.parts[0] == PromptPart(
        text="a red fox", weight=1.0, emphasis=(("a ", 1.0), ("red", 1.3), (" fox", 1.0))
    )
