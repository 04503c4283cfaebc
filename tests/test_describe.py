"""``/describe``: a tiny random BLIP loaded through the real code, the OpenAI path against the fake API."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from tests.fakes.openai_server import FakeOpenAIServer
from workers.describe import (
    Captioner,
    Description,
    add_unique,
    clean_caption,
    describe_image,
    describe_openai,
    describe_outcome,
    load_captioner,
    nearest_ratio,
)
from workers.schema import TASK_DESCRIBE, ErrorCode, JobRequest, TaskOutcome, WorkerError
from workers.settings import WorkerSettings
from workers.tiny_extras import make_tiny_captioner

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

KEY = "sk-test-describe-0000"


def settings(**values: object) -> WorkerSettings:
    """Worker settings from these values only (no .env, no environment surprises)."""
    return WorkerSettings(_env_file=None, device="cpu", **values)  # type: ignore[call-arg]


def picture(size: tuple[int, int] = (96, 64), colour: tuple[int, int, int] = (30, 140, 220)) -> bytes:
    out = io.BytesIO()
    image = Image.new("RGB", size, colour)
    image.paste((240, 240, 20), (size[0] // 3, size[1] // 3, size[0] // 2, size[1] // 2))
    image.save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def captioner(tmp_path_factory: pytest.TempPathFactory) -> Captioner:
    """A tiny random BLIP with a locally made vocabulary, saved and loaded through load_captioner."""
    folder = make_tiny_captioner(tmp_path_factory.mktemp("tiny-blip"))
    return load_captioner(settings(describe_model=str(folder), describe_max_tokens=12))


# --- captioning model ------------------------------------------------------------------------


def test_four_distinct_suggestions_with_the_pictures_aspect(captioner: Captioner) -> None:
    description = describe_image(captioner, picture((96, 64)), seed=11)
    assert len(description.captions) == 4
    assert len({c.casefold() for c in description.captions}) == 4
    assert all(c.strip() and "--" not in c for c in description.captions)
    assert description.aspect == (3, 2)
    assert all(p.endswith(" --ar 3:2") for p in description.prompts)


def test_same_seed_same_suggestions_other_seed_others(captioner: Captioner) -> None:
    data = base64.b64encode(picture()).decode("ascii")  # as carried in a job message
    first = describe_image(captioner, data, seed=5)
    again = describe_image(captioner, data, seed=5)
    other = describe_image(captioner, data, seed=6)
    assert first == again
    assert first.captions != other.captions


def test_unreadable_picture_is_bad_input(captioner: Captioner) -> None:
    with pytest.raises(WorkerError) as info:
        describe_image(captioner, b"not a picture", seed=1, label="image 1 (scan.png)")
    assert info.value.code is ErrorCode.BAD_INPUT
    assert info.value.message == "Image 1 (scan.png) is not a readable image."


def test_missing_model_folder_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(WorkerError) as info:
        load_captioner(settings(describe_model=str(tmp_path / "nowhere")))
    assert info.value.code is ErrorCode.ENGINE_UNAVAILABLE and "DESCRIBE_MODEL" in info.value.message
    with pytest.raises(WorkerError, match=r"DESCRIBE_MODEL .* could not be loaded"):
        load_captioner(settings(describe_model=str(tmp_path)))


# --- text helpers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "ratio"),
    [
        ((1500, 1000), (3, 2)),
        ((1024, 683), (3, 2)),
        ((1920, 1080), (16, 9)),
        ((1080, 1920), (9, 16)),
        ((1000, 1001), (1, 1)),
        ((1000, 700), (10, 7)),
        ((2390, 1000), (12, 5)),
        ((800, 600), (4, 3)),
        ((5000, 100), (16, 1)),
    ],
)
def test_nearest_whole_number_ratio(size: tuple[int, int], ratio: tuple[int, int]) -> None:
    assert nearest_ratio(*size) == ratio


def test_captions_cannot_smuggle_parameters_or_weights() -> None:
    assert clean_caption("1. arafed cat on a sofa --ar 16:9 —no dogs") == "cat on a sofa ar 16:9 no dogs"
    assert clean_caption("  a fox::2 in   the snow.  ") == "a fox 2 in the snow"
    assert clean_caption("araffe") == ""
    assert clean_caption("##k shadow ##a man") == "k shadow a man"


@pytest.mark.parametrize(
    "caption",
    [
        "a sign –no entry on a door",  # an en dash is a parameter marker for the parser
        "a road sign ―ar 16:9 in the rain",  # so is a horizontal bar
        "a poster, text ﹘stylize 900",  # NFKC makes a small em dash an em dash
        "a fox －－no snow",  # and fullwidth hyphens two hyphens
        "a fox ﹕﹕2 in snow",  # and small colons a :: weight
        "a poster reading {hello, world}",  # braces are permutations: two prompts
        "a clock showing (10:30) on a wall",  # emphasis whose weight is out of range
        "a ((red:2.5)) car",  # in range, but weights are not the model's to give
    ],
)
def test_cleaned_captions_parse_as_plain_text_with_only_their_ratio(caption: str) -> None:
    from bot.prompt import parse_prompt

    params = parse_prompt(f"{clean_caption(caption)} --ar 3:2")  # as the bot parses a pressed one
    assert params.aspect == (3, 2) and params.negative_prompt == ""
    assert params.stylize == 100 and params.parts == ()
    assert params.prompt and "{" not in params.prompt


def test_duplicates_differing_only_in_case_or_punctuation_are_dropped() -> None:
    found = ["A red fox"]
    add_unique(found, ["a red fox.", "A RED FOX!", "", "a blue fox", "a green fox", "a grey fox"], 3)
    assert found == ["A red fox", "a blue fox", "a green fox"]


def test_description_prompts_carry_the_ratio() -> None:
    description = Description(("a", "b"), (2, 3))
    assert description.prompts == ("a --ar 2:3", "b --ar 2:3")


# --- OpenAI --------------------------------------------------------------------------------------


def openai_settings(server: FakeOpenAIServer, **values: object) -> WorkerSettings:
    base: dict[str, object] = {
        "openai_api_key": KEY,
        "openai_base_url": server.base_url,
        "openai_max_retries": 0,
        "openai_describe_model": "gpt-4o-mini",
    }
    return settings(**{**base, **values})


def test_openai_describe_sends_the_picture_and_returns_four_prompts() -> None:
    with FakeOpenAIServer(KEY) as server:
        description = describe_openai(picture((64, 128), (200, 0, 0)), openai_settings(server))
        [request] = [r for r in server.requests if r.path == "/v1/chat/completions"]
    assert request.fields["model"] == "gpt-4o-mini"
    assert request.image is not None and request.image.size == (64, 128)
    assert request.image.format == "PNG"
    assert len(description.captions) == 4 and description.aspect == (1, 2)
    assert description.prompts[0].startswith("a picture in rgb(") and description.prompts[0].endswith(
        "--ar 1:2"
    )


def test_openai_answer_is_cleaned_and_deduplicated() -> None:
    with FakeOpenAIServer(KEY) as server:
        server.chat_replies.append(
            json.dumps(
                {"prompts": ["a cat --ar 1:1 --v 6", "A cat.", "a dog::2", "a bird", "a cow", "a fish"]}
            )
        )
        description = describe_openai(picture(), openai_settings(server))
    assert description.captions == ("a cat ar 1:1 v 6", "A cat", "a dog 2", "a bird")


def test_openai_plain_lines_are_accepted() -> None:
    with FakeOpenAIServer(KEY) as server:
        server.chat_replies.append(
            "1. a lighthouse at dusk\n2. a lighthouse at dusk\n3) stormy sea, oil painting\n"
        )
        description = describe_openai(picture(), openai_settings(server))
    assert description.captions == ("a lighthouse at dusk", "stormy sea, oil painting")


def test_openai_errors_are_member_facing() -> None:
    with FakeOpenAIServer(KEY) as server:
        with pytest.raises(WorkerError) as wrong_key:
            describe_openai(picture(), openai_settings(server, openai_api_key="sk-wrong-key-1234"))
        server.rate_limit_next(1)
        with pytest.raises(WorkerError) as limited:
            describe_openai(picture(), openai_settings(server))
    assert wrong_key.value.code is ErrorCode.ENGINE_UNAVAILABLE
    assert "sk-wrong" not in wrong_key.value.message
    assert limited.value.code is ErrorCode.ENGINE_ERROR and "rate limiting" in limited.value.message


def test_openai_without_a_key_names_the_setting() -> None:
    with pytest.raises(WorkerError) as info:
        describe_openai(picture(), settings(openai_api_key=""))
    assert info.value.code is ErrorCode.ENGINE_UNAVAILABLE and "OPENAI_API_KEY" in info.value.message


# --- the task ------------------------------------------------------------------------------------


def describe_job(data: bytes, **fields: object) -> dict[str, object]:
    """A DESCRIBE job message as the bot sends it."""
    values: dict[str, object] = {
        "job_id": "describe-1",
        "kind": "describe",
        "params": {"prompt": ""},
        "seed": 5,
        "input_image": base64.b64encode(data).decode("ascii"),
    }
    values.update(fields)
    return JobRequest.model_validate(values).model_dump(mode="json")


def test_task_describes_with_the_local_captioner(tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = make_tiny_captioner(tmp_path_factory.mktemp("tiny-blip-task"))
    config = settings(describe_model=str(folder), describe_max_tokens=12)
    outcome = TaskOutcome.model_validate(
        describe_outcome("describe-1", describe_job(picture((96, 64))), config)
    )
    again = TaskOutcome.model_validate(
        describe_outcome("describe-1", describe_job(picture((96, 64))), config)
    )
    assert outcome.error is None and outcome.result is None and outcome.describe is not None
    result = outcome.describe
    assert result.job_id == "describe-1" and result.aspect == "3:2" and result.model == str(folder)
    assert len(result.prompts) == 4 and all(p.endswith(" --ar 3:2") for p in result.prompts)
    assert again.describe is not None and again.describe.prompts == result.prompts  # same seed


def test_task_describes_with_openai_when_the_job_says_so() -> None:
    with FakeOpenAIServer(KEY) as server:
        raw = describe_job(picture((64, 128)), params={"prompt": "", "engine": "openai"})
        outcome = TaskOutcome.model_validate(describe_outcome("describe-1", raw, openai_settings(server)))
    assert outcome.describe is not None
    assert outcome.describe.model == "gpt-4o-mini" and outcome.describe.aspect == "1:2"
    assert len(outcome.describe.prompts) == 4


def test_task_describes_with_openai_for_a_job_with_an_openai_model() -> None:
    with FakeOpenAIServer(KEY) as server:
        raw = describe_job(picture((64, 128)), openai_model="gpt-image-1")
        outcome = TaskOutcome.model_validate(describe_outcome("describe-1", raw, openai_settings(server)))
        assert [r.path for r in server.requests] == ["/v1/chat/completions"]
    assert outcome.describe is not None and outcome.describe.model == "gpt-4o-mini"


def test_task_failures_are_typed_errors() -> None:
    config = settings(openai_api_key="")
    no_key = describe_job(picture(), params={"prompt": "", "engine": "openai"})
    wrong_kind = describe_job(picture(), kind="imagine")
    no_picture = describe_job(picture(), input_image=None)
    old = {**describe_job(picture()), "version": 1}
    codes = {
        name: TaskOutcome.model_validate(describe_outcome("describe-1", raw, config)).error
        for name, raw in {
            "no_key": no_key,
            "wrong_kind": wrong_kind,
            "no_picture": no_picture,
            "old": old,
            "garbage": {"job_id": "describe-1"},
        }.items()
    }
    assert {name: error.code if error else None for name, error in codes.items()} == {
        "no_key": ErrorCode.ENGINE_UNAVAILABLE,
        "wrong_kind": ErrorCode.BAD_INPUT,
        "no_picture": ErrorCode.BAD_INPUT,
        "old": ErrorCode.ENGINE_UNAVAILABLE,
        "garbage": ErrorCode.BAD_INPUT,
    }


def test_describe_task_is_registered_under_the_schema_name() -> None:
    from workers.tasks import run_describe

    assert run_describe.name == TASK_DESCRIBE == "mirage.describe.run"
