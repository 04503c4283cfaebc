"""Building the ``JobResult`` (``workers.results``) and encoding it (``workers.imaging.encode_image``)."""

from __future__ import annotations

import base64
import io
from typing import Any

import pytest
from PIL import Image

from workers.imaging import DEFAULT_COMPRESS_LEVEL, encode_image
from workers.output import EngineOutput
from workers.results import EncodeOptions, build_result
from workers.schema import (
    Engine,
    EngineReport,
    GenerationParams,
    ImageFormat,
    JobKind,
    JobRequest,
    JobResult,
    Layout,
    SafetyVerdict,
)

REPORT = EngineReport(engine=Engine.SDXL, model="test-model", steps=2)


def photo(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A small image with varied pixels (a flat colour would hide a lossy encoder)."""
    width, height = size
    image = Image.new("RGB", size)
    image.putdata(
        [
            ((x * 7 + seed * 31) % 256, (y * 5 + seed) % 256, (x * y + seed) % 256)
            for y in range(height)
            for x in range(width)
        ]
    )
    return image


def request(count: int = 4) -> JobRequest:
    return JobRequest(
        job_id="job-r", kind=JobKind.IMAGINE, params=GenerationParams(prompt="x"), seed=11, count=count
    )


def output(count: int = 4, **fields: Any) -> EngineOutput:
    values: dict[str, Any] = {"images": [photo(i) for i in range(count)], "seed": 11, "report": REPORT}
    values.update(fields)
    return EngineOutput(**values)


def pixels(result: JobResult) -> Image.Image:
    with Image.open(io.BytesIO(base64.b64decode(result.image.data_b64))) as image:
        image.load()
        return image.convert("RGB")


def test_four_images_become_one_grid_in_u_order() -> None:
    images = [photo(i) for i in range(4)]
    result = build_result(request(), output(images=images), 0.0, engine_s=1.0, clock=lambda: 1.0)
    assert result.layout is Layout.GRID
    assert (result.image.width, result.image.height) == (128, 96)
    assert (result.tile_width, result.tile_height) == (64, 48)
    grid = pixels(result)
    for index, image in enumerate(images):  # U1 U2 / U3 U4
        x, y = (index % 2) * 64, (index // 2) * 48
        assert grid.crop((x, y, x + 64, y + 48)).tobytes() == image.tobytes()


def test_one_image_is_a_single_result_with_its_own_size() -> None:
    (image,) = output(1).images
    result = build_result(request(1), output(images=[image]), 0.0, engine_s=1.0)
    assert result.layout is Layout.SINGLE
    assert (result.image.width, result.image.height) == (result.tile_width, result.tile_height) == (64, 48)
    assert pixels(result).tobytes() == image.tobytes()


def test_result_carries_the_engines_facts() -> None:
    result = build_result(request(), output(seed=42, notes=["n1", "n2", "n1", ""]), 0.0, engine_s=1.0)
    assert result.job_id == "job-r"
    assert result.seed == 42
    assert result.report == REPORT
    assert result.notes == ["n1", "n2"]  # in order, each once


def test_timings_sum_the_phases_and_count_from_the_task_start() -> None:
    ticks = iter([10.0, 10.5])  # encode start, encode end
    result = build_result(
        request(),
        output(phases={"denoise": 2.0, "vae_decode": 0.5}, load_s=0.25),
        7.0,
        engine_s=3.0,
        load_s=1.0,
        clock=lambda: next(ticks),
    )
    timings = result.timings
    assert timings.generation_s == 2.5  # the phases, not the wall time
    assert timings.phases == {"denoise": 2.0, "vae_decode": 0.5}
    assert timings.encode_s == 0.5
    assert timings.total_s == 3.5
    assert timings.load_s == 1.25  # the task's load plus the engine's own


def test_without_phases_generation_is_the_engines_wall_time() -> None:
    result = build_result(request(), output(), 0.0, engine_s=1.75)
    assert result.timings.generation_s == 1.75
    assert result.timings.phases == {}


@pytest.mark.parametrize(
    ("images", "problem"),
    [
        ([], "no images"),
        ([photo(0), photo(1, (64, 64)), photo(2), photo(3)], "different sizes"),
        ([photo(0), photo(1)], "2 images"),
    ],
)
def test_outputs_that_break_the_contract_are_refused(images: list[Image.Image], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        build_result(request(), output(images=images), 0.0, engine_s=1.0)


@pytest.mark.parametrize("image_format", list(ImageFormat))
@pytest.mark.parametrize("level", [None, 0, 9])
def test_every_format_and_level_is_lossless(image_format: ImageFormat, level: int | None) -> None:
    images = [photo(i) for i in range(4)]
    options = EncodeOptions(image_format, level)
    result = build_result(request(), output(images=images), 0.0, engine_s=1.0, options=options)
    assert result.image.format is image_format
    data = base64.b64decode(result.image.data_b64)
    assert Image.open(io.BytesIO(data)).format == image_format.name
    grid = pixels(result)
    assert grid.crop((64, 48, 128, 96)).tobytes() == images[3].tobytes()


def test_the_default_is_lossless_webp_at_its_fastest_level() -> None:
    assert EncodeOptions() == EncodeOptions(ImageFormat.WEBP, None)
    assert DEFAULT_COMPRESS_LEVEL == {ImageFormat.PNG: 1, ImageFormat.WEBP: 0}


@pytest.mark.parametrize("image_format", list(ImageFormat))
def test_encoded_files_carry_no_metadata(image_format: ImageFormat) -> None:
    image = photo(0)
    image.info = {"icc_profile": b"\0" * 128, "exif": b"Exif\0\0", "dpi": (300, 300)}
    data = encode_image(image, image_format)
    with Image.open(io.BytesIO(data)) as decoded:
        assert not {"icc_profile", "exif", "dpi", "xmp", "parameters"} & set(decoded.info)
        assert not getattr(decoded, "text", {})
    assert image.info["dpi"] == (300, 300)  # the caller's image is left alone


def test_rgba_keeps_its_alpha_and_other_modes_become_rgb() -> None:
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    for image_format in ImageFormat:
        with Image.open(io.BytesIO(encode_image(rgba, image_format))) as decoded:
            assert decoded.mode == "RGBA"
            assert decoded.getpixel((0, 0)) == (10, 20, 30, 0)  # exact: colour under alpha 0 kept
    grey = Image.new("L", (8, 8), 77)
    with Image.open(io.BytesIO(encode_image(grey, ImageFormat.PNG))) as decoded:
        assert decoded.mode == "RGB" and decoded.getpixel((0, 0)) == (77, 77, 77)


def test_a_compress_level_outside_0_to_9_is_refused() -> None:
    with pytest.raises(ValueError):
        encode_image(photo(0), ImageFormat.PNG, 10)


def test_safety_verdicts_ride_along_one_per_image() -> None:
    verdicts = [SafetyVerdict(label="normal", score=0.1 * i, unsafe=False) for i in range(4)]
    result = build_result(request(), output(), 0.0, engine_s=1.0, safety=verdicts, safety_s=0.2)
    assert result.safety == verdicts
    assert result.timings.phases["safety"] == 0.2
    assert result.timings.generation_s == 1.0  # the check is not generation
    with pytest.raises(ValueError, match="3 safety verdicts for 4 images"):
        build_result(request(), output(), 0.0, engine_s=1.0, safety=verdicts[:3])
