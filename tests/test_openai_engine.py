"""The OpenAI engine end to end: the real ``openai`` client against the validating fake API."""

from __future__ import annotations

import base64
import io
import logging
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from pydantic import SecretStr

from workers.openai_engine import OpenAIEngine, RateLimiter, check_credentials, make_client, model_spec
from workers.openai_engine.canvas import outpaint_canvas, pan_layout, zoom_layout
from workers.openai_engine.errors import redact
from workers.openai_engine.models import nearest_size
from workers.output import EngineOutput
from workers.schema import (
    Direction,
    Engine,
    ErrorCode,
    GenerationParams,
    JobKind,
    JobRequest,
    Progress,
    WorkerError,
    b64encode_bytes,
    nearest_bucket,
)
from workers.settings import WorkerSettings

# The fakes live in the ``tests.fakes`` package (its __init__ imports ``tests.fakes.…``), which
# needs the repository root on sys.path: pytest's ``pythonpath = ["."]`` or ``python -m pytest``.
# Plain ``pytest`` without that setting gets it added here.
try:
    from tests.fakes.openai_server import ApiError, FakeOpenAIServer, RecordedRequest, Scripted
except ModuleNotFoundError:  # pragma: no cover - depends on how pytest was started
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.fakes.openai_server import ApiError, FakeOpenAIServer, RecordedRequest, Scripted

KEY = "sk-test-Zq8mN3vR5tY7wX9aB2cD4eF6"
WRONG_KEY = "sk-wrong-Hj4kL6mN8pQ0rS2tU4vW6xY8"

pytestmark = pytest.mark.timeout(30)


# ---------------------------------------------------------------------- fixtures and helpers


@pytest.fixture
def fake() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(KEY) as server:
        yield server


def make_settings(fake: FakeOpenAIServer, key: str = KEY, **overrides: Any) -> WorkerSettings:
    values: dict[str, Any] = {
        "openai_api_key": SecretStr(key),
        "openai_base_url": fake.base_url,
        "openai_timeout_s": 5.0,
        "openai_max_retries": 2,
        "openai_requests_per_minute": 10_000,
        **overrides,
    }
    return WorkerSettings(_env_file=None, **values)  # type: ignore[call-arg]


class SleepRecorder:
    """Records the engine's retry waits (and really sleeps them: they are kept tiny)."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        time.sleep(seconds)


def make_engine(
    fake: FakeOpenAIServer,
    key: str = KEY,
    *,
    limiter: RateLimiter | None = None,
    sleep: SleepRecorder | None = None,
    **overrides: Any,
) -> OpenAIEngine:
    settings = make_settings(fake, key, **overrides)
    return OpenAIEngine(
        make_client(settings),
        api_key=settings.openai_api_key,
        max_retries=settings.openai_max_retries,
        timeout_s=settings.openai_timeout_s,
        rate_limiter=limiter or RateLimiter(10_000),
        sleep=sleep,
        backoff_base_s=0.01,
        poll_s=0.02,
    )


def png_b64(size: tuple[int, int], colour: tuple[int, int, int] = (200, 30, 60)) -> str:
    image = Image.new("RGB", size, colour)
    image.putpixel((0, 0), (0, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return b64encode_bytes(buffer.getvalue())


def job(
    kind: JobKind = JobKind.IMAGINE,
    *,
    model: str | None = "dall-e-3",
    aspect: tuple[int, int] = (1, 1),
    negative: str = "",
    **fields: Any,
) -> JobRequest:
    width, height = nearest_bucket(*aspect)
    params = GenerationParams(
        prompt="a lighthouse at dusk", negative_prompt=negative, aspect=aspect, width=width, height=height
    )
    return JobRequest(
        job_id="job-1234abcd", kind=kind, params=params, seed=1234, openai_model=model, **fields
    )


def sizes(output: EngineOutput) -> list[tuple[int, int]]:
    return [image.size for image in output.images]


def alpha_box(request: RecordedRequest) -> tuple[int, int, int, int] | None:
    assert request.mask is not None
    return request.mask.getchannel("A").getbbox()


# ---------------------------------------------------------------------- grids


def test_dalle3_grid_is_four_requests_of_one(fake: FakeOpenAIServer) -> None:
    result = make_engine(fake).run(job(model="dall-e-3"))

    sent = fake.image_requests("generations")
    assert [r.status for r in sent] == [200] * 4
    for request in sent:
        assert request.fields["model"] == "dall-e-3"
        assert request.fields["n"] == 1
        assert request.fields["size"] == "1024x1024"
        assert request.fields["response_format"] == "b64_json"
        assert request.headers["Authorization"] == f"Bearer {KEY}"
    assert sizes(result) == [(1024, 1024)] * 4
    assert all(image.mode == "RGB" for image in result.images)
    assert result.seed == 1234
    assert result.report.engine is Engine.OPENAI
    assert result.report.model == "dall-e-3"
    assert any("no seeds" in note and "not reproducible" in note for note in result.notes)
    assert result.phases["api"] > 0


def test_dalle2_grid_is_one_request_of_four(fake: FakeOpenAIServer) -> None:
    result = make_engine(fake).run(job(model="dall-e-2", aspect=(16, 9)))

    (request,) = fake.image_requests()
    assert request.status == 200
    assert request.fields["model"] == "dall-e-2"
    assert request.fields["n"] == 4
    assert request.fields["size"] == "1024x1024"  # dall-e-2 is square only
    assert sizes(result) == [(1024, 1024)] * 4


def test_gpt_image_grid_never_sends_response_format(fake: FakeOpenAIServer) -> None:
    result = make_engine(fake).run(job(model="gpt-image-1", aspect=(3, 2)))

    (request,) = fake.image_requests()
    assert request.status == 200
    assert request.fields["model"] == "gpt-image-1"
    assert request.fields["n"] == 4
    assert request.fields["size"] == "1536x1024"
    assert "response_format" not in request.fields  # the API rejects it for GPT image models
    assert sizes(result) == [(1536, 1024)] * 4


def test_default_model_is_dalle3(fake: FakeOpenAIServer) -> None:
    make_engine(fake).run(job(model=None))
    assert {r.fields["model"] for r in fake.image_requests()} == {"dall-e-3"}


@pytest.mark.parametrize(
    ("aspect", "dalle3", "gpt"),
    [
        ((1, 1), (1024, 1024), (1024, 1024)),
        ((16, 9), (1792, 1024), (1536, 1024)),
        ((3, 2), (1792, 1024), (1536, 1024)),
        ((9, 16), (1024, 1792), (1024, 1536)),
        ((2, 3), (1024, 1792), (1024, 1536)),
        ((5, 4), (1024, 1024), (1536, 1024)),  # 1.29 is nearer 1.5 than 1, but not 1.75
        ((4, 5), (1024, 1024), (1024, 1536)),
        ((4, 1), (1792, 1024), (1536, 1024)),
        ((4, 3), (1792, 1024), (1536, 1024)),  # ln 1.33 is 0.27 from ln 1.75, 0.29 from ln 1
        ((3, 4), (1024, 1792), (1024, 1536)),
        ((16, 13), (1024, 1024), (1536, 1024)),  # its bucket 1088x896 made gpt-image square
    ],
)
def test_aspect_maps_to_nearest_allowed_size(
    fake: FakeOpenAIServer, aspect: tuple[int, int], dalle3: tuple[int, int], gpt: tuple[int, int]
) -> None:
    assert nearest_size(model_spec("dall-e-3").sizes, *aspect) == dalle3
    assert nearest_size(model_spec("gpt-image-1").sizes, *aspect) == gpt
    assert nearest_size(model_spec("dall-e-2").sizes, *aspect) == (1024, 1024)
    # The request is sized from the --ar itself, not from the SDXL bucket it also picked:
    # 4:3's bucket (1152x896, 1.29) is on the other side of dall-e-3's square/wide boundary.
    engine = make_engine(fake)
    for model, expected in (("dall-e-3", dalle3), ("gpt-image-1", gpt)):
        engine.run(job(model=model, aspect=aspect, count=1))
        assert fake.image_requests()[-1].fields["size"] == f"{expected[0]}x{expected[1]}"


def test_wide_dalle3_grid_end_to_end(fake: FakeOpenAIServer) -> None:
    result = make_engine(fake).run(job(model="dall-e-3", aspect=(16, 9)))
    assert {r.fields["size"] for r in fake.image_requests()} == {"1792x1024"}
    assert sizes(result) == [(1792, 1024)] * 4


def test_negative_prompt_becomes_an_avoid_sentence(fake: FakeOpenAIServer) -> None:
    make_engine(fake).run(job(model="dall-e-2", negative="text, watermark"))
    (request,) = fake.image_requests()
    assert request.fields["prompt"] == "a lighthouse at dusk\n\nAvoid: text, watermark."


def test_prompt_over_the_model_limit_is_bad_input_without_a_request(fake: FakeOpenAIServer) -> None:
    params = GenerationParams(prompt="x" * 1001)
    request = JobRequest(job_id="j", kind=JobKind.IMAGINE, params=params, seed=1, openai_model="dall-e-2")
    with pytest.raises(WorkerError) as info:
        make_engine(fake).run(request)
    assert info.value.code is ErrorCode.BAD_INPUT
    assert fake.image_requests() == []


def test_progress_after_each_request(fake: FakeOpenAIServer) -> None:
    reports: list[Progress] = []
    make_engine(fake).run(job(model="dall-e-3"), progress=reports.append)
    assert [p.percent for p in reports] == [0, 25, 50, 75, 100]
    assert reports[-1].step == reports[-1].total_steps == 4


def test_output_images_carry_no_metadata(fake: FakeOpenAIServer) -> None:
    # The API's files may hold provenance metadata; the engine hands over bare pixels only.
    result = make_engine(fake).run(job(model="dall-e-2"))
    for image in result.images:
        assert image.info == {}
        assert not getattr(image, "text", {})


def test_ignored_parameters_are_noted(fake: FakeOpenAIServer) -> None:
    params = GenerationParams(prompt="a lighthouse", tile=True, steps=40)
    request = JobRequest(job_id="j", kind=JobKind.IMAGINE, params=params, seed=1, openai_model="dall-e-2")
    notes = make_engine(fake).run(request).notes
    assert any("--tile" in note for note in notes)
    assert any("--steps" in note for note in notes)


# ---------------------------------------------------------------------- variations


def test_dalle2_variation_uses_the_variation_endpoint(fake: FakeOpenAIServer) -> None:
    result = make_engine(fake).run(
        job(JobKind.VARIATION, model="dall-e-2", input_image=png_b64((1216, 832)), strength=0.85)
    )
    (request,) = fake.image_requests()
    assert request.endpoint == "variations"
    assert request.fields["n"] == "4"
    assert request.image is not None and request.image.size == (1024, 1024)
    assert len(result.images) == 4
    assert any("centre" in note for note in result.notes)


@pytest.mark.parametrize(("strength", "fidelity"), [(0.5, "high"), (0.85, "low"), (None, "low")])
def test_dalle3_variation_falls_back_to_gpt_image_edit(
    fake: FakeOpenAIServer, strength: float | None, fidelity: str
) -> None:
    result = make_engine(fake).run(
        job(JobKind.VARIATION, model="dall-e-3", input_image=png_b64((1024, 1024)), strength=strength)
    )
    (request,) = fake.image_requests()
    assert request.endpoint == "edits"
    assert request.status == 200
    assert request.fields["model"] == "gpt-image-1"
    assert request.fields["input_fidelity"] == fidelity
    assert request.mask is None
    assert result.report.model == "gpt-image-1"
    assert any("dall-e-3 has no variations" in note for note in result.notes)
    assert len(result.images) == 4


# ---------------------------------------------------------------------- zoom, pan, square


@pytest.mark.parametrize(
    ("scale", "box"),
    [(2.0, (256, 256, 768, 768)), (1.5, (171, 171, 854, 854))],
)
@pytest.mark.parametrize("model", ["dall-e-2", "gpt-image-1", "dall-e-3"])
def test_zoom_out_sends_a_transparent_border_mask(
    fake: FakeOpenAIServer, model: str, scale: float, box: tuple[int, int, int, int]
) -> None:
    result = make_engine(fake).run(
        job(JobKind.ZOOM, model=model, input_image=png_b64((1024, 1024)), scale=scale)
    )

    (request,) = fake.image_requests()
    assert request.endpoint == "edits"
    assert request.status == 200
    assert request.fields["model"] == ("dall-e-2" if model == "dall-e-2" else "gpt-image-1")
    assert request.fields["n"] == "4"
    mask, image = request.mask, request.image
    assert mask is not None and image is not None
    assert mask.mode == "RGBA" and image.mode == "RGBA"
    assert mask.size == image.size == (1024, 1024)
    alpha = mask.getchannel("A")
    assert alpha.getpixel((5, 5)) == 0 and alpha.getpixel((1018, 1018)) == 0  # border: paint
    assert alpha.getpixel((512, 512)) == 255  # centre: keep
    assert alpha_box(request) == box
    side = box[2] - box[0]
    assert abs(side - 1024 / scale) <= 1  # the original shrank by exactly the zoom factor
    assert set(alpha.getdata()) == {0, 255}  # fully transparent or fully opaque, nothing between
    assert image.getchannel("A").getbbox() == box  # the image's own transparency matches
    assert sizes(result) == [(1024, 1024)] * 4


def test_zoom_keeps_aspect_on_gpt_image(fake: FakeOpenAIServer) -> None:
    make_engine(fake).run(
        job(JobKind.ZOOM, model="gpt-image-1", aspect=(3, 2), input_image=png_b64((1536, 1024)), scale=2.0)
    )
    (request,) = fake.image_requests()
    assert request.fields["size"] == "1536x1024"
    assert alpha_box(request) == (384, 256, 1152, 768)


def test_pan_right_extends_the_right_side(fake: FakeOpenAIServer) -> None:
    result = make_engine(fake).run(
        job(JobKind.PAN, model="gpt-image-1", input_image=png_b64((1024, 1024)), direction=Direction.RIGHT)
    )
    (request,) = fake.image_requests()
    assert request.fields["size"] == "1536x1024"
    assert alpha_box(request) == (0, 0, 1024, 1024)  # original on the left, new band on the right
    assert sizes(result) == [(1536, 1024)] * 4


def test_pan_up_on_dalle2_is_square_with_the_band_on_top(fake: FakeOpenAIServer) -> None:
    make_engine(fake).run(
        job(JobKind.PAN, model="dall-e-2", input_image=png_b64((1024, 1024)), direction=Direction.UP)
    )
    (request,) = fake.image_requests()
    assert request.fields["size"] == "1024x1024"
    box = alpha_box(request)
    assert box is not None
    left, top, right, bottom = box
    assert bottom == 1024 and top == 341  # a third of the height revealed above the original
    assert right - left == bottom - top  # the original keeps its aspect
    alpha = request.mask.getchannel("A") if request.mask else None
    assert alpha is not None and alpha.getpixel((512, 10)) == 0 and alpha.getpixel((512, 1000)) == 255


@pytest.mark.parametrize(
    ("direction", "box"),
    [
        (Direction.LEFT, (512, 0, 1536, 1024)),
        (Direction.DOWN, (0, 0, 1024, 1024)),
    ],
)
def test_pan_layout_geometry(direction: Direction, box: tuple[int, int, int, int]) -> None:
    image = Image.new("RGB", (1024, 1024))
    sizes = model_spec("gpt-image-1").edit_sizes
    canvas, mask, size = outpaint_canvas(image, pan_layout(image.size, direction), sizes)
    assert size == ((1536, 1024) if direction is Direction.LEFT else (1024, 1536))
    assert mask.getchannel("A").getbbox() == box
    assert canvas.getchannel("A").getbbox() == box


def test_make_square_pads_both_sides(fake: FakeOpenAIServer) -> None:
    make_engine(fake).run(job(JobKind.SQUARE, model="gpt-image-1", input_image=png_b64((1536, 1024))))
    (request,) = fake.image_requests()
    assert request.fields["size"] == "1024x1024"
    assert alpha_box(request) == (0, 171, 1024, 854)  # 683 rows centred


def test_make_square_of_a_square_is_refused(fake: FakeOpenAIServer) -> None:
    with pytest.raises(WorkerError) as info:
        make_engine(fake).run(job(JobKind.SQUARE, model="gpt-image-1", input_image=png_b64((512, 512))))
    assert info.value.code is ErrorCode.BAD_INPUT


def test_zoom_factor_validation() -> None:
    with pytest.raises(WorkerError):
        zoom_layout((64, 64), 1.0)


# ---------------------------------------------------------------------- upscale and inputs


def test_upscale_is_a_local_lanczos_resample(fake: FakeOpenAIServer) -> None:
    result = make_engine(fake).run(job(JobKind.UPSCALE, input_image=png_b64((832, 1216)), count=1))
    assert fake.requests == []
    assert sizes(result) == [(1664, 2432)]
    assert result.report.model == "lanczos"
    assert any("Lanczos" in note and "2x" in note for note in result.notes)


def test_upscale_works_without_a_key(fake: FakeOpenAIServer) -> None:
    engine = OpenAIEngine.load(make_settings(fake, key=""))
    result = engine.run(job(JobKind.UPSCALE, input_image=png_b64((64, 64)), count=1))
    assert sizes(result) == [(128, 128)]


@pytest.mark.parametrize(
    "data",
    [
        None,
        "not base64!!",
        base64.b64encode(b"definitely not a png").decode(),
        base64.b64encode(base64.b64decode(png_b64((64, 64)))[:60]).decode(),  # truncated
    ],
)
@pytest.mark.parametrize("kind", [JobKind.VARIATION, JobKind.ZOOM, JobKind.UPSCALE])
def test_corrupt_or_missing_input_is_bad_input(
    fake: FakeOpenAIServer, data: str | None, kind: JobKind
) -> None:
    with pytest.raises(WorkerError) as info:
        make_engine(fake).run(job(kind, model="dall-e-2", input_image=data))
    assert info.value.code is ErrorCode.BAD_INPUT
    assert fake.requests == []


# ---------------------------------------------------------------------- errors and retries


def test_429_is_retried_honouring_retry_after(fake: FakeOpenAIServer) -> None:
    fake.rate_limit_next(1, retry_after="0.1")
    sleep = SleepRecorder()
    result = make_engine(fake, sleep=sleep).run(job(model="dall-e-2"))

    assert [r.status for r in fake.image_requests()] == [429, 200]
    assert sleep.waits == [0.1]
    sent = fake.image_requests()
    assert sent[1].started - sent[0].started >= 0.1
    assert len(result.images) == 4


def test_429_retry_after_ms_wins(fake: FakeOpenAIServer) -> None:
    body = ApiError(429, "Rate limit reached.", type="requests", code="rate_limit_exceeded").body
    fake.script(Scripted(429, body, {"retry-after": "30", "retry-after-ms": "50"}))
    sleep = SleepRecorder()
    make_engine(fake, sleep=sleep).run(job(model="dall-e-2"))
    assert sleep.waits == [0.05]


def test_retry_after_beyond_the_cap_is_not_waited_out(fake: FakeOpenAIServer) -> None:
    fake.rate_limit_next(1, retry_after="3600")
    sleep = SleepRecorder()
    with pytest.raises(WorkerError) as info:
        make_engine(fake, sleep=sleep).run(job(model="dall-e-2"))
    assert info.value.code is ErrorCode.ENGINE_ERROR
    assert sleep.waits == []
    assert len(fake.image_requests()) == 1


def test_insufficient_quota_is_not_retried(fake: FakeOpenAIServer) -> None:
    fake.rate_limit_next(1, code="insufficient_quota")
    with pytest.raises(WorkerError) as info:
        make_engine(fake).run(job(model="dall-e-2"))
    assert info.value.code is ErrorCode.ENGINE_UNAVAILABLE
    assert len(fake.image_requests()) == 1


@pytest.mark.parametrize(
    ("model", "code"), [("dall-e-2", "content_policy_violation"), ("gpt-image-1", "moderation_blocked")]
)
def test_content_policy_is_not_retried(fake: FakeOpenAIServer, model: str, code: str) -> None:
    fake.content_policy_next(1, code=code)
    sleep = SleepRecorder()
    with pytest.raises(WorkerError) as info:
        make_engine(fake, sleep=sleep).run(job(model=model))
    assert info.value.code is ErrorCode.CONTENT_POLICY
    assert "safety system" in info.value.message
    assert len(fake.image_requests()) == 1
    assert sleep.waits == []


def test_content_policy_on_one_dalle3_request_fails_the_job(fake: FakeOpenAIServer) -> None:
    fake.content_policy_next(1)
    with pytest.raises(WorkerError) as info:
        make_engine(fake).run(job(model="dall-e-3"))
    assert info.value.code is ErrorCode.CONTENT_POLICY
    assert len(fake.image_requests()) <= 4  # each request at most once: no retries


def test_persistent_500_gives_up_after_bounded_retries(fake: FakeOpenAIServer) -> None:
    fake.server_error_next(10)
    sleep = SleepRecorder()
    started = time.monotonic()
    with pytest.raises(WorkerError) as info:
        make_engine(fake, sleep=sleep, openai_max_retries=2).run(job(model="dall-e-2"))
    assert info.value.code is ErrorCode.ENGINE_ERROR
    assert [r.status for r in fake.image_requests()] == [500, 500, 500]  # 1 + 2 retries
    assert len(sleep.waits) == 2
    assert sleep.waits[1] > sleep.waits[0]  # exponential
    assert time.monotonic() - started < 5


def test_500_then_success(fake: FakeOpenAIServer) -> None:
    fake.server_error_next(1, status=503)
    result = make_engine(fake, sleep=SleepRecorder()).run(job(model="dall-e-2"))
    assert [r.status for r in fake.image_requests()] == [503, 200]
    assert len(result.images) == 4


def test_zero_retries_means_one_attempt(fake: FakeOpenAIServer) -> None:
    fake.server_error_next(2)
    with pytest.raises(WorkerError) as info:
        make_engine(fake, openai_max_retries=0).run(job(model="dall-e-2"))
    assert info.value.code is ErrorCode.ENGINE_ERROR
    assert len(fake.image_requests()) == 1


def test_timeout_is_reported_as_timeout(fake: FakeOpenAIServer) -> None:
    fake.delay_next(1, seconds=1.0)
    with pytest.raises(WorkerError) as info:
        make_engine(fake, openai_timeout_s=0.2).run(job(model="dall-e-2"))
    assert info.value.code is ErrorCode.TIMEOUT


def test_bad_key_is_engine_unavailable_and_never_leaks(
    fake: FakeOpenAIServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(WorkerError) as info:
        make_engine(fake, WRONG_KEY).run(job(model="dall-e-3"))
    err = info.value
    assert err.code is ErrorCode.ENGINE_UNAVAILABLE
    assert err.message.startswith("The OpenAI image engine is unavailable right now")
    assert (err.__cause__, err.__suppress_context__) == (None, True)  # no chained API error
    fragments = (WRONG_KEY, WRONG_KEY[-4:] + ".", WRONG_KEY[8:20])
    for text in (err.message, str(err), caplog.text):
        assert not any(fragment in text for fragment in fragments)
    assert "Traceback" not in caplog.text
    assert {r.status for r in fake.image_requests()} == {401}
    assert len(fake.image_requests()) <= 4  # 401 is never retried


def test_missing_key_is_engine_unavailable_without_a_request(fake: FakeOpenAIServer) -> None:
    engine = OpenAIEngine.load(make_settings(fake, key=""))
    with pytest.raises(WorkerError) as info:
        engine.run(job(model="dall-e-3"))
    assert info.value.code is ErrorCode.ENGINE_UNAVAILABLE
    assert fake.requests == []


def test_retired_model_is_engine_unavailable(caplog: pytest.LogCaptureFixture) -> None:
    with FakeOpenAIServer(KEY, retired_models=("dall-e-3",)) as fake:
        with pytest.raises(WorkerError) as info:
            make_engine(fake).run(job(model="dall-e-3"))
    assert info.value.code is ErrorCode.ENGINE_UNAVAILABLE
    assert "dall-e-3" in info.value.message


def test_unknown_model_is_refused_before_any_request(fake: FakeOpenAIServer) -> None:
    with pytest.raises(WorkerError) as info:
        make_engine(fake).run(job(model="midjourney-v6"))
    assert info.value.code is ErrorCode.ENGINE_UNAVAILABLE
    assert fake.requests == []


def test_newer_gpt_image_models_use_gpt_image_rules() -> None:
    spec = model_spec("gpt-image-1.5")
    assert spec.name == "gpt-image-1.5"
    assert spec.sizes == model_spec("gpt-image-1").sizes
    assert not spec.response_format


def test_fake_rejects_what_the_real_api_rejects(fake: FakeOpenAIServer) -> None:
    client = make_client(make_settings(fake))
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(model="dall-e-3", prompt="x", n=2, size="1024x1024")
    assert info.value.param == "n"
    with pytest.raises(openai.BadRequestError):
        client.images.generate(model="dall-e-3", prompt="x", size="1536x1024")
    with pytest.raises(openai.BadRequestError):
        client.images.generate(model="gpt-image-1", prompt="x", response_format="b64_json")
    with pytest.raises(openai.BadRequestError):
        client.images.generate(model="dall-e-2", prompt="x", size="1792x1024")
    rgb = ("image.png", base64.b64decode(png_b64((256, 256))), "image/png")
    with pytest.raises(openai.BadRequestError):  # dall-e-2 edit without mask needs alpha
        client.images.edit(model="dall-e-2", image=rgb, prompt="x")
    small_mask = ("mask.png", base64.b64decode(png_b64((128, 128))), "image/png")
    with pytest.raises(openai.BadRequestError):  # mask size differs, and has no alpha
        client.images.edit(model="dall-e-2", image=rgb, mask=small_mask, prompt="x")
    wide = ("image.png", base64.b64decode(png_b64((512, 256))), "image/png")
    with pytest.raises(openai.BadRequestError):  # dall-e-2 inputs must be square
        client.images.create_variation(image=wide)
    with pytest.raises(openai.BadRequestError):
        client.images.create_variation(image=rgb, model="dall-e-3")
    with pytest.raises(openai.AuthenticationError) as auth:
        make_client(make_settings(fake, key=WRONG_KEY)).images.generate(prompt="x")
    assert auth.value.code == "invalid_api_key"
    client.close()


def test_url_responses_are_downloaded(fake: FakeOpenAIServer) -> None:
    engine = make_engine(fake)
    client = make_client(make_settings(fake))
    response = client.images.generate(
        model="dall-e-2", prompt="x", n=2, size="256x256", response_format="url"
    )
    assert response.data and response.data[0].url
    outcome = engine._collect(response, 1)
    assert [image.size for image in outcome.images] == [(256, 256)] * 2
    client.close()


# ---------------------------------------------------------------------- credentials check


def test_check_credentials(fake: FakeOpenAIServer) -> None:
    assert check_credentials(make_settings(fake)) is None
    assert check_credentials(make_settings(fake), models=("dall-e-3", "gpt-image-1")) is None
    missing = check_credentials(make_settings(fake), models=("gpt-image-9",))
    assert missing is not None and "gpt-image-9" in missing

    bad = check_credentials(make_settings(fake, key=WRONG_KEY))
    assert bad is not None and "rejected" in bad
    assert WRONG_KEY not in bad and WRONG_KEY[-4:] not in bad

    empty = check_credentials(make_settings(fake, key=""))
    assert empty is not None and "OPENAI_API_KEY" in empty


def test_check_credentials_unreachable() -> None:
    settings = WorkerSettings(  # type: ignore[call-arg]
        _env_file=None,
        openai_api_key=SecretStr(KEY),
        openai_base_url="http://127.0.0.1:9/v1",
        openai_timeout_s=2,
    )
    message = check_credentials(settings)
    assert message is not None and "reach" in message


def test_redact_removes_keys() -> None:
    text = f"boom {KEY} and sk-proj-abcdEFGH1234 and sk-ab**********yz12"
    cleaned = redact(text, KEY)
    assert "sk-" not in cleaned and KEY not in cleaned


# ---------------------------------------------------------------------- rate limiting and cancel


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_rate_limiter_sliding_window() -> None:
    clock = FakeClock()
    limiter = RateLimiter(3, clock=clock, sleep=clock.sleep, poll_s=5.0)
    for _ in range(3):  # at t=1000, 1010, 1020
        assert limiter.acquire()
        clock.now += 10
    assert clock.slept == []
    assert limiter.try_acquire() == pytest.approx(30.0)  # t=1030: the t=1000 slot frees at 1060

    assert limiter.acquire()  # waits it out, polling every 5 s at most
    assert clock.now == pytest.approx(1060.0)
    assert sum(clock.slept) == pytest.approx(30.0)
    assert all(s <= 5.0 for s in clock.slept)
    # In the window now: 1010, 1020, 1060; the next slot frees at 1070.
    assert limiter.try_acquire() == pytest.approx(10.0)


def test_rate_limiter_acquire_stops_when_told() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1, clock=clock, sleep=clock.sleep)
    assert limiter.acquire()
    calls = iter([False, False, True])
    assert limiter.acquire(stop=lambda: next(calls)) is False
    assert clock.now < 1060


def test_rate_limiter_is_thread_safe() -> None:
    clock = FakeClock()
    limiter = RateLimiter(5, clock=clock, sleep=clock.sleep)
    granted: list[bool] = []
    lock = threading.Lock()
    barrier = threading.Barrier(20)

    def worker() -> None:
        barrier.wait()
        ok = limiter.try_acquire() == 0.0
        with lock:
            granted.append(ok)

    threads = [threading.Thread(target=worker) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert granted.count(True) == 5


def test_engine_requests_go_through_the_limiter(fake: FakeOpenAIServer) -> None:
    # Two requests per 0.3 s window: the third and fourth of a dall-e-3 grid must wait.
    limiter = RateLimiter(2, window_s=0.3, poll_s=0.02)
    make_engine(fake, limiter=limiter).run(job(model="dall-e-3"))
    starts = sorted(r.started for r in fake.image_requests())
    assert len(starts) == 4
    assert starts[2] - starts[0] >= 0.25


def test_retries_also_take_limiter_slots(fake: FakeOpenAIServer) -> None:
    clock = FakeClock()
    limiter = RateLimiter(1000, clock=clock, sleep=clock.sleep)
    fake.server_error_next(1)
    make_engine(fake, limiter=limiter, sleep=SleepRecorder()).run(job(model="dall-e-2"))
    assert len(limiter._starts) == 2


def test_load_shares_one_limiter_per_process(fake: FakeOpenAIServer) -> None:
    a = OpenAIEngine.load(make_settings(fake, openai_requests_per_minute=777))
    b = OpenAIEngine.load(make_settings(fake, openai_requests_per_minute=777))
    assert a._limiter is b._limiter
    assert "sk-" not in repr(a)


def test_cancel_stops_remaining_requests(fake: FakeOpenAIServer) -> None:
    # One request per minute: the first goes out, the other three wait in the limiter until cancel.
    limiter = RateLimiter(1, poll_s=0.02)
    reports: list[Progress] = []
    started = time.monotonic()
    with pytest.raises(WorkerError) as info:
        make_engine(fake, limiter=limiter).run(
            job(model="dall-e-3"), progress=reports.append, cancelled=lambda: len(reports) >= 2
        )
    assert info.value.code is ErrorCode.CANCELLED
    assert time.monotonic() - started < 5
    time.sleep(0.1)
    assert len(fake.image_requests()) == 1


def test_cancelled_before_start_sends_nothing(fake: FakeOpenAIServer) -> None:
    with pytest.raises(WorkerError) as info:
        make_engine(fake).run(job(model="dall-e-3"), cancelled=lambda: True)
    assert info.value.code is ErrorCode.CANCELLED
    assert fake.requests == []


def test_engine_via_load_and_base_url(fake: FakeOpenAIServer) -> None:
    engine = OpenAIEngine.load(make_settings(fake))
    result = engine.run(job(model="gpt-image-1"))
    assert len(result.images) == 4
    engine.close()
