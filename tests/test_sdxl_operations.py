"""The SDXL engine's prompt language and image-input operations on the tiny offline model.

Weighted prompts, ``--weird``, ``--stop``, image prompts with and without the (tiny random)
IP-Adapter, BLEND, REGION (Vary Region) and Custom Zoom. 64 px, 2 steps, one torch thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("diffusers")

import torch

from workers.image_input import paste_outside, region_mask
from workers.imaging import encode_png
from workers.output import EngineOutput
from workers.schema import (
    ErrorCode,
    GenerationParams,
    JobKind,
    JobRequest,
    PromptPart,
    WorkerError,
    b64encode_bytes,
)
from workers.sdxl.engine import SDXLEngine
from workers.sdxl.outpaint import custom_zoom_canvas
from workers.settings import WorkerSettings
from workers.tiny_extras import TINY_IP_SUBFOLDER, TINY_IP_WEIGHT_NAME, make_tiny_ip_adapter

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _settings(model: Path, **overrides: Any) -> WorkerSettings:
    values: dict[str, Any] = {"sdxl_model": str(model), "warmup": False, **overrides}
    return WorkerSettings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture(scope="module")
def plain(tiny_model_dir: Path) -> SDXLEngine:
    """The tiny SDXL without an IP-Adapter."""
    torch.set_num_threads(1)
    return SDXLEngine.load(_settings(tiny_model_dir))


@pytest.fixture(scope="module")
def adapted(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> SDXLEngine:
    """The tiny SDXL with a tiny random IP-Adapter set through IP_ADAPTER_MODEL."""
    torch.set_num_threads(1)
    folder = make_tiny_ip_adapter(tmp_path_factory.mktemp("ip-adapter"), tiny_model_dir)
    return SDXLEngine.load(
        _settings(
            tiny_model_dir,
            ip_adapter_model=str(folder),
            ip_adapter_subfolder=TINY_IP_SUBFOLDER,
            ip_adapter_weight_name=TINY_IP_WEIGHT_NAME,
        )
    )


def _b64(image: Image.Image) -> str:
    return b64encode_bytes(encode_png(image))


def _picture(color: tuple[int, int, int], size: tuple[int, int] = (64, 64)) -> Image.Image:
    """A colour field with a contrasting square: structure for the encoders to see."""
    image = Image.new("RGB", size, color)
    inverse = (255 - color[0], 255 - color[1], 255 - color[2])
    image.paste(inverse, (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    return image


def _request(
    kind: JobKind = JobKind.IMAGINE, *, params: dict[str, Any] | None = None, **fields: Any
) -> JobRequest:
    values = {"prompt": "a lighthouse at dusk", "steps": 2, **(params or {})}
    return JobRequest(job_id="job-ops", kind=kind, params=GenerationParams(**values), seed=42, **fields)


def _arrays(result: EngineOutput) -> list[np.ndarray]:
    return [np.asarray(image).astype(int) for image in result.images]


def _same(a: EngineOutput, b: EngineOutput) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(_arrays(a), _arrays(b), strict=True))


# --------------------------------------------------------------------- prompt language


def test_plain_prompt_is_unchanged_by_the_weighted_encoding(plain: SDXLEngine) -> None:
    as_text = plain.run(_request(count=1))
    as_one_part = plain.run(_request(count=1, params={"parts": (PromptPart(text="a lighthouse at dusk"),)}))
    assert _same(as_text, as_one_part)


def test_part_weights_change_the_image(plain: SDXLEngine) -> None:
    parts = (PromptPart(text="a lighthouse", weight=0.9), PromptPart(text="fog", weight=0.1))
    other = (PromptPart(text="a lighthouse", weight=0.1), PromptPart(text="fog", weight=0.9))
    first = plain.run(_request(count=1, params={"prompt": "a lighthouse::9 fog::1", "parts": parts}))
    second = plain.run(_request(count=1, params={"prompt": "a lighthouse::1 fog::9", "parts": other}))
    assert not _same(first, second)


def test_weird_is_deterministic_changes_the_image_and_is_noted(plain: SDXLEngine) -> None:
    normal = plain.run(_request(count=2))
    weird = plain.run(_request(count=2, params={"weird": 1000}))
    again = plain.run(_request(count=2, params={"weird": 1000}))
    assert _same(weird, again)
    assert not _same(normal, weird)
    assert any("--weird" in note for note in weird.notes)
    assert not any("--weird" in note for note in normal.notes)


def test_stop_leaves_the_image_unfinished_and_says_so(plain: SDXLEngine) -> None:
    full = plain.run(_request(count=1, params={"steps": 4}))
    stopped = plain.run(_request(count=1, params={"steps": 4, "stop": 50}))
    assert plain.last_info["stop"] == 0.5
    assert not _same(full, stopped)
    assert any(note.startswith("--stop 50") for note in stopped.notes)


@pytest.mark.parametrize(
    ("kind", "sampler", "steps", "stop", "evaluations"),
    [
        # Vary (Subtle) runs 5 of its 10 steps; --stop 60 is 3 of those. Cut by noise level
        # (denoising_end 0.6 of the whole schedule) it ran none and returned the noised input.
        (JobKind.VARIATION, "dpm", 10, 60, 3),
        # euler's 4 steps start below the 10 % noise cutoff: no step ran, the image was noise.
        (JobKind.IMAGINE, "euler", 4, 10, 1),
        # DPM++ Karras packs its steps at low noise: --stop 80 ran 12 of 20 steps, not 16.
        (JobKind.IMAGINE, "dpm", 20, 80, 16),
    ],
)
def test_stop_ends_after_that_share_of_the_jobs_own_steps(
    plain: SDXLEngine,
    monkeypatch: pytest.MonkeyPatch,
    kind: JobKind,
    sampler: str,
    steps: int,
    stop: int,
    evaluations: int,
) -> None:
    calls = 0
    unet = plain.txt2img.unet  # shared by all three pipelines
    forward = unet.forward

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1  # one per step: guidance batches both halves into one evaluation
        return forward(*args, **kwargs)

    monkeypatch.setattr(unet, "forward", counting)
    extra: dict[str, Any] = {}
    if kind is JobKind.VARIATION:
        extra = {"input_image": _b64(_picture((180, 120, 60))), "strength": 0.5}
    plain.run(_request(kind, count=1, params={"steps": steps, "stop": stop, "sampler": sampler}, **extra))
    assert calls == evaluations
    assert plain.last_info["stop"] == stop / 100


# ------------------------------------------------------------------------ image inputs


def test_image_prompt_without_adapter_starts_from_the_picture(plain: SDXLEngine) -> None:
    text_only = plain.run(_request(count=1))
    with_image = plain.run(_request(count=1, references={"prompt": [_b64(_picture((200, 30, 30)))]}))
    assert not _same(text_only, with_image)
    assert plain.last_info["fallback_strength"] == 0.8  # --iw 1
    assert any("IP_ADAPTER_MODEL" in note for note in with_image.notes)


def test_style_reference_without_adapter_is_noted_and_ignored(plain: SDXLEngine) -> None:
    text_only = plain.run(_request(count=1))
    styled = plain.run(_request(count=1, references={"style": [_b64(_picture((0, 0, 200)))]}))
    assert _same(text_only, styled)
    assert any(note.startswith("--sref needs an IP-Adapter (IP_ADAPTER_MODEL)") for note in styled.notes)


def test_adapter_applies_references_and_switches_off_after(adapted: SDXLEngine) -> None:
    before = adapted.run(_request(count=1))
    red = adapted.run(_request(count=1, references={"prompt": [_b64(_picture((220, 20, 20)))]}))
    blue = adapted.run(_request(count=1, references={"prompt": [_b64(_picture((20, 20, 220)))]}))
    styled = adapted.run(_request(count=1, references={"style": [_b64(_picture((20, 220, 20)))]}))
    after = adapted.run(_request(count=1))
    assert not _same(red, blue)
    assert not _same(before, styled)
    assert _same(before, after)
    assert adapted.ip_adapter is not None and not adapted.ip_adapter.is_active
    assert not red.notes


def test_bad_reference_is_bad_input_naming_it(plain: SDXLEngine) -> None:
    with pytest.raises(WorkerError) as info:
        plain.run(_request(references={"character": ["bm90IGFuIGltYWdl"]}))
    assert info.value.code is ErrorCode.BAD_INPUT
    assert info.value.message.startswith("--cref image 1 ")


# ------------------------------------------------------------------------------- blend


def _blend(count: int) -> JobRequest:
    colours = [(220, 20, 20), (20, 20, 220), (20, 200, 20), (200, 200, 20), (20, 200, 200), (90, 90, 90)]
    pictures = [_b64(_picture(colour)) for colour in colours[:count]]
    return _request(JobKind.BLEND, params={"prompt": ""}, references={"prompt": pictures})


def test_blend_with_adapter_is_a_grid_from_the_averaged_embeddings(adapted: SDXLEngine) -> None:
    two = adapted.run(_blend(2))
    assert adapted.last_info["blended"] == 2
    three = adapted.run(_blend(3))
    assert [image.size for image in two.images] == [(64, 64)] * 4
    assert not _same(two, three)
    assert _same(two, adapted.run(_blend(2)))
    assert not two.notes


def test_blend_without_adapter_averages_the_pictures_and_notes_it(plain: SDXLEngine) -> None:
    result = plain.run(_blend(2))
    assert [image.size for image in result.images] == [(64, 64)] * 4
    assert any("averaging the pictures" in note and "IP_ADAPTER_MODEL" in note for note in result.notes)


@pytest.mark.parametrize("count", [1, 6])
def test_blend_needs_two_to_five_pictures(plain: SDXLEngine, count: int) -> None:
    with pytest.raises(WorkerError) as info:
        plain.run(_blend(count))
    assert info.value.code is ErrorCode.BAD_INPUT


# ------------------------------------------------------------------------------ region


def test_region_changes_only_the_masked_area(plain: SDXLEngine) -> None:
    source = _picture((180, 120, 60))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (40, 8, 60, 28))
    result = plain.run(
        _request(JobKind.REGION, input_image=_b64(source), mask_image=_b64(mask.convert("RGB")))
    )
    original = np.asarray(source).astype(int)
    keep = np.ones((64, 64), dtype=bool)
    keep[8 - 4 : 28 + 4, 40 - 4 : 60 + 4] = False  # the region and its fade (2 x 2 px feather)
    changed = 0
    for image in _arrays(result):
        assert image.shape == (64, 64, 3)
        assert np.array_equal(image[keep], original[keep])
        changed += int(np.abs(image[8:28, 40:60] - original[8:28, 40:60]).sum() > 0)
    assert changed == 4
    assert plain.last_info["strength"] == 0.95


def test_region_without_a_selection_is_bad_input(plain: SDXLEngine) -> None:
    source = _b64(_picture((180, 120, 60)))
    for request in (
        _request(JobKind.REGION, input_image=source),
        _request(JobKind.REGION, input_image=source, mask_image=_b64(Image.new("RGB", (64, 64)))),
    ):
        with pytest.raises(WorkerError) as info:
            plain.run(request)
        assert info.value.code is ErrorCode.BAD_INPUT


def test_region_mask_is_resized_and_thresholded() -> None:
    upload = Image.new("L", (128, 128), 0)
    upload.paste(200, (0, 0, 64, 128))
    mask = region_mask(upload, (64, 64))
    assert mask.size == (64, 64)
    assert set(np.unique(np.asarray(mask))) == {0, 255}
    assert np.asarray(mask)[:, :30].min() == 255 and np.asarray(mask)[:, 34:].max() == 0


def test_paste_outside_keeps_the_region_new_and_the_rest_old() -> None:
    old = Image.new("RGB", (32, 32), (0, 0, 0))
    new = Image.new("RGB", (32, 32), (255, 255, 255))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (10, 10, 20, 20))
    out = np.asarray(paste_outside(new, old, mask, 2))
    assert (out[10:20, 10:20] == 255).all()
    assert (out[:5] == 0).all() and (out[25:] == 0).all()


def test_grown_mask_is_exactly_the_rank_filters() -> None:
    """Vary (Region) grows its mask for the inpaint call and each paste-back with numpy (Pillow's
    MaxFilter(65) took about 3 s a time on a 1024 px mask); the pixels must not change."""
    from PIL import ImageFilter

    from workers.image_input import grow_mask

    mask = Image.new("L", (1024, 1024), 0)
    mask.paste(255, (300, 200, 700, 600))
    old = Image.new("RGB", mask.size, (0, 0, 0))
    new = Image.new("RGB", mask.size, (255, 255, 255))
    out = np.asarray(paste_outside(new, old, mask, 32))
    assert (out[200:600, 300:700] == 255).all() and (out[:100] == 0).all()
    # The same pixels as the rank filter, for binary and grey masks alike, edges included.
    rng = np.random.default_rng(0)
    for values in (rng.integers(0, 2, (61, 97)) * 255, rng.integers(0, 256, (61, 97))):
        small = Image.fromarray(values.astype(np.uint8))
        for radius in (1, 2, 7):
            expected = small.filter(ImageFilter.MaxFilter(2 * radius + 1))
            assert np.array_equal(np.asarray(grow_mask(small, radius)), np.asarray(expected))


# ------------------------------------------------------------------------- custom zoom


def test_custom_zoom_to_a_wider_aspect_keeps_the_picture_centred(plain: SDXLEngine) -> None:
    source = _picture((180, 120, 60))
    result = plain.run(
        _request(
            JobKind.ZOOM,
            input_image=_b64(source),
            scale=1.0,
            params={"aspect": (2, 1), "width": 1408, "height": 704},
        )
    )
    inner = np.asarray(source.resize((48, 48), Image.Resampling.LANCZOS)).astype(int)
    for image in _arrays(result):
        assert image.shape == (48, 96, 3)  # the 2:1 bucket at the tiny model's size
        # Away from the seams the picture is there unchanged; the sides are new.
        assert np.array_equal(image[:, 24 + 4 : 72 - 4], inner[:, 4:-4])
    assert plain.last_info["zoom_aspect"] == "2:1"


def test_custom_zoom_factor_in_between_keeps_the_shape(plain: SDXLEngine) -> None:
    result = plain.run(_request(JobKind.ZOOM, input_image=_b64(_picture((180, 120, 60))), scale=1.5))
    assert [image.size for image in result.images] == [(64, 64)] * 4
    assert plain.last_info["zoom"] == 1.5


@pytest.mark.parametrize("scale", [0.9, 2.5, 1.0])
def test_zoom_factor_outside_1_to_2_or_a_no_op_is_bad_input(plain: SDXLEngine, scale: float) -> None:
    with pytest.raises(WorkerError) as info:
        plain.run(_request(JobKind.ZOOM, input_image=_b64(_picture((1, 2, 3))), scale=scale))
    assert info.value.code is ErrorCode.BAD_INPUT


def test_custom_zoom_canvas_geometry() -> None:
    canvas, mask = custom_zoom_canvas(Image.new("RGB", (64, 64), (9, 9, 9)), 2.0, (128, 64))
    assert canvas.size == mask.size == (128, 64)
    keep = np.asarray(mask) == 0
    rows, cols = np.flatnonzero(keep.any(axis=1)), np.flatnonzero(keep.any(axis=0))
    assert (rows[0], rows[-1], cols[0], cols[-1]) == (16, 47, 48, 79)  # 32 px, centred
    assert np.asarray(canvas)[16:48, 48:80].max() == 9


def test_upscale_ignores_weird_so_every_tile_shares_one_prompt(plain: SDXLEngine) -> None:
    source = _b64(_picture((180, 120, 60)))
    plain_up = plain.run(_request(JobKind.UPSCALE, input_image=source, count=1))
    weird_up = plain.run(_request(JobKind.UPSCALE, input_image=source, count=1, params={"weird": 2000}))
    assert _same(plain_up, weird_up)
    assert not any("--weird" in note for note in weird_up.notes)
