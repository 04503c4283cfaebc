"""The OpenAI engine and the prompt language and image inputs: what reaches the (fake) Images API.

Prompts (model_prompt, the "Avoid:" sentence), --style raw/--stylize/--quality, notes for what the
API cannot do, reference pictures and /blend through images.edit, Vary (Region) with its mask
converted to the API's convention, and Custom Zoom with a new --ar.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.fakes.openai_server import FakeOpenAIServer
from workers.openai_engine import OpenAIEngine, RateLimiter
from workers.openai_engine.canvas import zoom_layout
from workers.schema import (
    ErrorCode,
    GenerationParams,
    JobKind,
    JobRequest,
    PromptPart,
    WorkerError,
    b64encode_bytes,
    nearest_bucket,
)

KEY = "sk-test-inputs-0000"


@pytest.fixture
def fake() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(KEY) as server:
        yield server


def engine(fake: FakeOpenAIServer) -> OpenAIEngine:
    import openai

    client = openai.OpenAI(api_key=KEY, base_url=fake.base_url, max_retries=0, timeout=10)
    return OpenAIEngine(client, max_retries=0, rate_limiter=RateLimiter(10_000), poll_s=0.02)


def png(size: tuple[int, int], colour: tuple[int, int, int] = (200, 30, 60), mode: str = "RGB") -> str:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format="PNG")
    return b64encode_bytes(buffer.getvalue())


def job(
    kind: JobKind = JobKind.IMAGINE,
    *,
    model: str = "gpt-image-1",
    params: dict[str, Any] | None = None,
    **fields: Any,
) -> JobRequest:
    values: dict[str, Any] = {"prompt": "a lighthouse at dusk", **(params or {})}
    if "aspect" in values:
        values["width"], values["height"] = nearest_bucket(*values["aspect"])
    return JobRequest(
        job_id="job-inputs",
        kind=kind,
        params=GenerationParams(**values),
        seed=9,
        openai_model=model,
        **fields,
    )


# ---------------------------------------------------------------------------- prompt language


def test_prompt_is_the_model_prompt_with_negative_parts_avoided(fake: FakeOpenAIServer) -> None:
    parts = (
        PromptPart(text="castle", weight=0.7),
        PromptPart(text="fog", weight=0.3),
        PromptPart(text="people", weight=-0.5),
    )
    result = engine(fake).run(
        job(
            model="dall-e-2",
            params={"prompt": "castle::2 fog::1 people::-.5", "parts": parts, "negative_prompt": "text"},
        )
    )
    (request,) = fake.image_requests()
    assert request.fields["prompt"] == "castle, fog\n\nAvoid: text, people."
    assert any("weights were not applied" in note for note in result.notes)


@pytest.mark.parametrize(
    ("params", "style"),
    [({"raw": True}, "natural"), ({"stylize": 50}, "natural"), ({"stylize": 500}, "vivid"), ({}, None)],
)
def test_style_raw_and_stylize_pick_dalle3_style(
    fake: FakeOpenAIServer, params: dict[str, Any], style: str | None
) -> None:
    engine(fake).run(job(model="dall-e-3", params=params, count=1))
    (request,) = fake.image_requests()
    assert request.fields.get("style") == style


@pytest.mark.parametrize(("quality", "expected"), [(0.25, "low"), (0.5, "medium"), (2, "high")])
def test_quality_maps_to_gpt_image_quality(fake: FakeOpenAIServer, quality: float, expected: str) -> None:
    engine(fake).run(job(params={"quality": quality}))
    (request,) = fake.image_requests()
    assert request.fields["quality"] == expected


def test_sdxl_only_parameters_are_noted_never_refused(fake: FakeOpenAIServer) -> None:
    params = {"chaos": 50, "weird": 250, "stop": 50, "draft": True, "stylize": 400}
    notes = " ".join(engine(fake).run(job(params=params)).notes)
    for flag in ("--chaos", "--weird", "--stop", "--draft", "--stylize"):
        assert flag in notes


# ------------------------------------------------------------------------------- image inputs


def test_references_go_to_a_gpt_image_edit_with_every_picture(fake: FakeOpenAIServer) -> None:
    refs = {
        "prompt": [png((64, 64), (250, 0, 0))],
        "style": [png((64, 64), (0, 250, 0)), png((64, 64), (0, 0, 250))],
        "character": [png((64, 64), (250, 250, 0))],
    }
    result = engine(fake).run(job(params={"aspect": (3, 2)}, references=refs))
    (request,) = fake.image_requests()
    assert request.endpoint == "edits" and request.fields["size"] == "1536x1024"
    assert [image.getpixel((0, 0))[:3] for image in request.images] == [
        (250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 250, 0)
    ]  # fmt: skip
    prompt = request.fields["prompt"]
    assert prompt.startswith("a lighthouse at dusk\n\nAbout the attached pictures: use picture 1 ")
    assert "style of pictures 2, 3" in prompt and "character from picture 4" in prompt
    assert request.fields["input_fidelity"] == "high"
    assert len(result.images) == 4


def test_dalle3_notes_image_inputs_and_generates_from_the_text(fake: FakeOpenAIServer) -> None:
    result = engine(fake).run(job(model="dall-e-3", count=1, references={"style": [png((32, 32))]}))
    (request,) = fake.image_requests()
    assert request.endpoint == "generations"
    assert any(note.startswith("dall-e-3 cannot take --sref") for note in result.notes)


def test_blend_sends_the_pictures_in_one_edit(fake: FakeOpenAIServer) -> None:
    pictures = [png((64, 64), (250, 0, 0)), png((64, 64), (0, 0, 250)), png((64, 64), (0, 250, 0))]
    result = engine(fake).run(job(JobKind.BLEND, params={"prompt": ""}, references={"prompt": pictures}))
    (request,) = fake.image_requests()
    assert request.endpoint == "edits" and len(request.images) == 3 and request.fields["n"] == "4"
    assert request.fields["prompt"].startswith("Blend the 3 attached pictures into one new picture")
    assert len(result.images) == 4


def test_blend_on_dalle3_is_made_with_gpt_image(fake: FakeOpenAIServer) -> None:
    pictures = [png((64, 64), (250, 0, 0)), png((64, 64), (0, 0, 250))]
    result = engine(fake).run(
        job(JobKind.BLEND, model="dall-e-3", params={"prompt": ""}, references={"prompt": pictures})
    )
    (request,) = fake.image_requests()
    assert request.fields["model"] == "gpt-image-1"
    assert "dall-e-3 cannot blend pictures: made with gpt-image-1." in result.notes


def test_blend_of_one_picture_is_bad_input_without_a_request(fake: FakeOpenAIServer) -> None:
    with pytest.raises(WorkerError) as info:
        engine(fake).run(job(JobKind.BLEND, references={"prompt": [png((64, 64))]}))
    assert info.value.code is ErrorCode.BAD_INPUT
    assert fake.image_requests() == []


# ------------------------------------------------------------------------------ vary (region)


def _mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> str:
    mask = Image.new("RGB", size, (0, 0, 0))
    mask.paste((255, 255, 255), box)
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return b64encode_bytes(buffer.getvalue())


def test_region_mask_is_transparent_where_white_and_the_rest_is_kept(fake: FakeOpenAIServer) -> None:
    request = job(
        JobKind.REGION,
        input_image=png((1024, 1024), (10, 120, 200)),
        mask_image=_mask((512, 512), (128, 128, 256, 256)),  # a smaller mask is scaled to the picture
    )
    result = engine(fake).run(request)
    (sent,) = fake.image_requests()
    assert sent.endpoint == "edits" and sent.mask is not None and sent.fields["size"] == "1024x1024"
    alpha = sent.mask.getchannel("A")
    assert alpha.getbbox() == (0, 0, 1024, 1024)
    assert alpha.getpixel((300, 300)) == 0 and alpha.getpixel((100, 100)) == 255
    for image in result.images:
        pixels = np.asarray(image).astype(int)
        assert (pixels[:200, :] == (10, 120, 200)).all() and (pixels[600:, :] == (10, 120, 200)).all()
        assert (pixels[300, 300] != (10, 120, 200)).any()  # the region was repainted


def test_region_on_dalle3_uses_gpt_image_and_needs_a_mask(fake: FakeOpenAIServer) -> None:
    source = png((1024, 1024))
    result = engine(fake).run(
        job(
            JobKind.REGION,
            model="dall-e-3",
            input_image=source,
            mask_image=_mask((1024, 1024), (0, 0, 10, 10)),
        )
    )
    assert fake.image_requests()[0].fields["model"] == "gpt-image-1"
    assert any("repainted with gpt-image-1" in note for note in result.notes)
    for mask in (None, _mask((64, 64), (0, 0, 0, 0))):
        with pytest.raises(WorkerError) as info:
            engine(fake).run(job(JobKind.REGION, input_image=source, mask_image=mask))
        assert info.value.code is ErrorCode.BAD_INPUT


# -------------------------------------------------------------------------------- custom zoom


def test_custom_zoom_to_a_wider_aspect(fake: FakeOpenAIServer) -> None:
    engine(fake).run(job(JobKind.ZOOM, params={"aspect": (3, 2)}, input_image=png((1024, 1024)), scale=1.0))
    (request,) = fake.image_requests()
    assert request.fields["size"] == "1536x1024"
    assert request.mask is not None and request.mask.getchannel("A").getbbox() == (256, 0, 1280, 1024)


def test_zoom_layout_widens_to_the_new_aspect() -> None:
    layout = zoom_layout((100, 100), 1.5, (2, 1))
    assert (layout.width, layout.height, layout.left, layout.top) == (300, 150, 100, 25)
    with pytest.raises(WorkerError):
        zoom_layout((100, 100), 1.0, (1, 1))


# ------------------------------------------------------------------- prompt-less follow-ups


@pytest.mark.parametrize(
    ("kind", "fields"),
    [
        (JobKind.ZOOM, {"scale": 2.0}),
        (JobKind.PAN, {"direction": "right"}),
        (JobKind.SQUARE, {}),
        (JobKind.REGION, {"mask_image": _mask((1024, 1024), (0, 0, 512, 512))}),
    ],
)
@pytest.mark.parametrize("model", ["gpt-image-1", "dall-e-2"])
def test_follow_ups_of_a_blend_send_a_prompt(
    fake: FakeOpenAIServer, kind: JobKind, fields: dict[str, Any], model: str
) -> None:
    # A /blend result has no words, but images.edit requires a prompt: the job must not fail.
    size = (1536, 1024) if kind is JobKind.SQUARE else (1024, 1024)
    result = engine(fake).run(
        job(kind, model=model, params={"prompt": ""}, input_image=png(size), count=1, **fields)
    )
    (request,) = fake.image_requests()
    assert request.endpoint == "edits" and request.status == 200
    assert request.fields["prompt"].strip()
    assert len(result.images) == 1
