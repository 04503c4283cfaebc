"""The SDXL engine on the tiny offline model: real loading code, every operation, determinism,
progress, cancellation, errors, shared weights and textual inversion. 64 px, 2-3 steps."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch")
pytest.importorskip("diffusers")

import torch

from workers.imaging import encode_png
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
    scale_bucket,
)
from workers.schema import b64encode_bytes as to_base64
from workers.sdxl.engine import SDXLEngine
from workers.sdxl.progress import ProgressReporter, preview_jpeg
from workers.sdxl.prompt import parse_lora_tags
from workers.sdxl.tiles import ramp, tile_grid
from workers.settings import WorkerSettings

STEPS = 2


def _settings(model: Path, **overrides: Any) -> WorkerSettings:
    values: dict[str, Any] = {"sdxl_model": str(model), "progress_report_interval_s": 1e-9, "warmup": False}
    values.update(overrides)
    return WorkerSettings(_env_file=None, **values)  # type: ignore[call-arg]


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Run torch on one thread: on the 2 shared CI cores, two OpenMP threads competing with other
    processes spin-wait on each other and turn a 0.1 s denoise into seconds."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    with _one_torch_thread():
        yield


@pytest.fixture(scope="session")
def sdxl(tiny_model_dir: Path) -> SDXLEngine:
    """The engine loaded through the real ``from_pretrained`` path, warm-up included."""
    with _one_torch_thread():  # session fixtures are set up before the module's autouse one
        return SDXLEngine.load(_settings(tiny_model_dir, warmup=True))


@pytest.fixture(scope="session")
def embeddings_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-vector SDXL textual inversion (clip_l + clip_g halves) made locally."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("embeddings")
    gen = torch.Generator().manual_seed(7)
    save_file(
        {"clip_l": torch.randn(2, 32, generator=gen), "clip_g": torch.randn(2, 32, generator=gen)},
        str(folder / "tinystyle.safetensors"),
    )
    save_file({"emb_params": torch.randn(1, 32, generator=gen)}, str(folder / "notsdxl.safetensors"))
    return folder


@pytest.fixture(scope="session")
def sdxl_extras(
    tiny_model_dir: Path, embeddings_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> SDXLEngine:
    """An engine with every optional part: separate VAE, refiner, embeddings and a LoRA folder."""
    from safetensors.torch import save_file

    loras = tmp_path_factory.mktemp("loras")
    save_file({"unet.down.lora_A.weight": torch.zeros(1, 1)}, str(loras / "mylora.safetensors"))
    with _one_torch_thread():
        return SDXLEngine.load(
            _settings(
                tiny_model_dir,
                sdxl_vae=str(tiny_model_dir / "vae"),
                sdxl_refiner=str(tiny_model_dir),
                embeddings_dir=embeddings_dir,
                loras_dir=loras,
            )
        )


def _request(kind: JobKind = JobKind.IMAGINE, *, seed: int = 42, **fields: Any) -> JobRequest:
    params = {"prompt": "a lighthouse at dusk", "steps": STEPS, **fields.pop("params", {})}
    return JobRequest(job_id="job-1", kind=kind, params=GenerationParams(**params), seed=seed, **fields)


def _images(result: EngineOutput) -> list[Image.Image]:
    assert all(image.mode == "RGB" and image.size == result.images[0].size for image in result.images)
    return result.images


def _pixels(result: EngineOutput) -> list[np.ndarray]:
    return [np.asarray(image) for image in _images(result)]


@pytest.fixture(scope="session")
def source_image() -> Image.Image:
    """A 64 px input with strong structure (a grid image's U# crop stands in for this)."""
    ys, xs = np.mgrid[0:64, 0:64]
    pixels = np.stack([xs * 4, ys * 4, ((xs // 8 + ys // 8) % 2) * 255], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8))


def _b64(image: Image.Image) -> str:
    return to_base64(encode_png(image))


@pytest.fixture
def interval(sdxl: SDXLEngine) -> Iterator[None]:
    """Restore the engine's progress settings after a test changes them."""
    saved = sdxl.progress_interval_s, sdxl.clock
    yield
    sdxl.progress_interval_s, sdxl.clock = saved


# ------------------------------------------------------------------------------- loading


def test_load_uses_the_models_native_resolution(sdxl: SDXLEngine) -> None:
    assert sdxl.base_resolution == 64  # UNet sample size 32 x VAE scale factor 2
    assert sdxl.device.type == "cpu" and sdxl.dtype is torch.float32
    assert sdxl.size_multiple == 16


def test_missing_model_is_engine_unavailable(tmp_path: Path) -> None:
    with pytest.raises(WorkerError) as info:
        SDXLEngine.load(_settings(tmp_path / "nope"))
    assert info.value.code is ErrorCode.ENGINE_UNAVAILABLE
    assert "does not exist" in info.value.message

    (tmp_path / "broken").mkdir()
    with pytest.raises(WorkerError) as info:
        SDXLEngine.load(_settings(tmp_path / "broken"))
    assert info.value.code is ErrorCode.ENGINE_UNAVAILABLE
    assert "\n" not in info.value.message


def test_importing_the_package_touches_neither_torch_nor_cuda(sdxl: SDXLEngine) -> None:
    code = "import sys, workers.sdxl; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    # Importing and even loading on CPU leaves CUDA alone (the worker parent may fork after import).
    assert not torch.cuda.is_initialized()


def test_pipelines_share_one_set_of_weights(sdxl: SDXLEngine) -> None:
    def storages(pipes: list[Any]) -> int:
        seen: dict[int, int] = {}
        for pipe in pipes:
            for component in pipe.components.values():
                if isinstance(component, torch.nn.Module):
                    for tensor in [*component.parameters(), *component.buffers()]:
                        seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return sum(seen.values())

    one = storages([sdxl.txt2img])
    assert storages([sdxl.txt2img, sdxl.img2img, sdxl.inpaint]) <= 1.1 * one
    assert sdxl.img2img.unet is sdxl.txt2img.unet and sdxl.inpaint.vae is sdxl.txt2img.vae


# ---------------------------------------------------------------------------- operations


def test_imagine_grid_is_four_images_at_the_bucket(sdxl: SDXLEngine) -> None:
    result = sdxl.run(_request())
    assert isinstance(result, EngineOutput) and result.seed == 42
    assert len(result.images) == 4
    assert {(out.width, out.height) for out in result.images} == {(64, 64)}
    assert result.report.engine is Engine.SDXL
    assert result.report.steps == STEPS and result.report.sampler == "dpm"
    assert result.report.device == "cpu" and result.report.dtype == "float32"
    assert sdxl.last_info["seeds"] == [42, 43, 44, 45]
    assert set(result.phases) == {"text_encode", "denoise", "vae_decode", "postprocess"}
    assert all(seconds > 0 for seconds in result.phases.values())
    assert result.notes == []
    pixels = _pixels(result)
    assert not np.array_equal(pixels[0], pixels[1])  # different seeds within the grid


def test_aspect_ratio_follows_the_scaled_bucket(sdxl: SDXLEngine) -> None:
    result = sdxl.run(_request(JobKind.REROLL, params={"aspect": (16, 9), "width": 1344, "height": 768}))
    expected = scale_bucket(1344, 768, 64)
    assert expected == (80, 48)
    assert [(out.width, out.height) for out in result.images] == [expected] * 4


def test_same_seed_same_pixels_different_seed_different(sdxl: SDXLEngine) -> None:
    first = _pixels(sdxl.run(_request(seed=7)))
    again = _pixels(sdxl.run(_request(seed=7)))
    other = _pixels(sdxl.run(_request(seed=8)))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0], other[0])
    # Seeds N..N+3: image 2 of seed 7 is image 1 of seed 8.
    assert np.array_equal(first[1], other[0])


def test_chaos_is_deterministic_and_adds_variety(sdxl: SDXLEngine) -> None:
    plain = _pixels(sdxl.run(_request(seed=3)))
    chaos = _pixels(sdxl.run(_request(seed=3, params={"chaos": 80})))
    chaos_again = _pixels(sdxl.run(_request(seed=3, params={"chaos": 80})))
    assert np.array_equal(chaos[0], chaos_again[0])
    assert not np.array_equal(plain[0], chaos[0])


def test_chaos_inputs_of_grid_image_k_are_those_of_seed_n_plus_k_alone(
    sdxl: SDXLEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Image k of a --chaos grid is rerun alone with seed N+k: its starting noise and prompt
    embedding may not depend on the other images (the jitter's size came from the spread of
    the whole batch's embeddings, which --weird makes differ per image)."""
    seen: list[dict[str, Any]] = []
    call = sdxl._call

    def spy(pipe: Any, job: Any, kwargs: dict[str, Any], **options: Any) -> torch.Tensor:
        seen.append(kwargs)
        return call(pipe, job, kwargs, **options)

    monkeypatch.setattr(sdxl, "_call", spy)
    params = {"chaos": 80, "weird": 1000}
    sdxl.run(_request(seed=7, params=params))
    sdxl.run(_request(seed=9, count=1, params=params))
    grid, alone = seen
    for name in ("latents", "prompt_embeds"):
        assert torch.equal(grid[name][2], alone[name][0]), name


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "ddim", "ddpm"])
def test_every_sampler_runs(sdxl: SDXLEngine, sampler: str) -> None:
    result = sdxl.run(_request(count=1, params={"sampler": sampler}))
    assert len(result.images) == 1 and result.report.sampler == sampler


def test_tile_pads_circularly_only_during_the_job(sdxl: SDXLEngine) -> None:
    tiled = _pixels(sdxl.run(_request(count=1, params={"tile": True})))
    plain = _pixels(sdxl.run(_request(count=1)))
    assert not np.array_equal(tiled[0], plain[0])
    convs = [m for m in sdxl.txt2img.unet.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(conv.padding_mode == "zeros" for conv in convs)


def test_variation_is_four_img2img_images(sdxl: SDXLEngine, source_image: Image.Image) -> None:
    result = sdxl.run(_request(JobKind.VARIATION, input_image=_b64(source_image), strength=0.5))
    assert len(result.images) == 4
    assert {(out.width, out.height) for out in result.images} == {(64, 64)}
    assert sdxl.last_info["strength"] == 0.5


def test_upscale_doubles_the_size(sdxl: SDXLEngine, source_image: Image.Image) -> None:
    wide = source_image.resize((80, 48))
    result = sdxl.run(_request(JobKind.UPSCALE, input_image=_b64(wide), count=1, strength=0.55))
    assert len(result.images) == 1
    assert (result.images[0].width, result.images[0].height) == (160, 96)
    assert sdxl.last_info["tiles"] > 1  # 160x96 is covered by several 64 px tiles


def test_zoom_keeps_the_original_in_the_centre(sdxl: SDXLEngine, source_image: Image.Image) -> None:
    result = sdxl.run(_request(JobKind.ZOOM, input_image=_b64(source_image), scale=2.0))
    assert len(result.images) == 4
    small = np.asarray(source_image.resize((32, 32), Image.Resampling.LANCZOS)).astype(int)
    for image in _images(result):
        assert image.size == (64, 64)
        centre = np.asarray(image).astype(int)[16:48, 16:48]
        # Away from the feathered seam the centre is the downscaled input, pixel for pixel.
        assert np.array_equal(centre[4:-4, 4:-4], small[4:-4, 4:-4])
        # At the seam it still resembles it; the border is new content.
        assert np.abs(centre - small).mean() < 20


def test_pan_right_extends_the_right_side(sdxl: SDXLEngine, source_image: Image.Image) -> None:
    result = sdxl.run(_request(JobKind.PAN, input_image=_b64(source_image), direction=Direction.RIGHT))
    assert len(result.images) == 4
    original = np.asarray(source_image).astype(int)
    for image in _images(result):
        assert image.size == (96, 64)  # +40 % rounded to the model's multiple of 16
        left = np.asarray(image).astype(int)[:, :64]
        assert np.array_equal(left[:, :60], original[:, :60])  # feather only at the seam


def test_square_outpaints_a_wide_image(sdxl: SDXLEngine, source_image: Image.Image) -> None:
    wide = source_image.resize((80, 48))
    result = sdxl.run(_request(JobKind.SQUARE, input_image=_b64(wide)))
    assert [(out.width, out.height) for out in result.images] == [(64, 64)] * 4


# ------------------------------------------------------------------- progress and errors


def test_progress_is_reported_during_and_at_the_end(sdxl: SDXLEngine, interval: None) -> None:
    sdxl.progress_interval_s = 1e-9
    reports: list[Progress] = []
    sdxl.run(_request(params={"steps": 3}), reports.append)
    assert len(reports) >= 3
    assert reports[0].step == 1 and reports[0].total_steps == 3 and reports[0].job_id == "job-1"
    assert reports[-1].percent == 100
    percents = [report.percent for report in reports]
    assert percents == sorted(percents) and max(percents[:-1]) < 100
    preview = Image.open(io.BytesIO(base64.b64decode(reports[0].preview or "")))
    assert preview.format == "JPEG" and max(preview.size) >= 128


def test_progress_is_throttled(sdxl: SDXLEngine, interval: None) -> None:
    sdxl.progress_interval_s = 10.0
    sdxl.clock = lambda: 5.0  # time stands still: only the first step and the final 100 %
    reports: list[Progress] = []
    sdxl.run(_request(params={"steps": 4}), reports.append)
    assert [report.percent for report in reports] == [25, 100]


def test_reporter_weights_phases() -> None:
    seen: list[Progress] = []
    reporter = ProgressReporter("j", seen.append, interval_s=0.0, total_steps=10, weights=(0.8, 0.2))
    reporter.step(7, 8, None)
    reporter.end_phase(8)
    reporter.step(1, 2, None)
    reporter.finish()
    assert [p.percent for p in seen] == [80, 99, 100]
    assert [p.step for p in seen] == [8, 10, 10]


def test_preview_is_a_small_grid() -> None:
    image = Image.open(io.BytesIO(base64.b64decode(preview_jpeg(torch.zeros(4, 4, 16, 16)))))
    assert image.size == (256, 256)


def test_cancel_interrupts_with_cancelled(sdxl: SDXLEngine) -> None:
    calls = 0

    def cancelled() -> bool:
        nonlocal calls
        calls += 1
        return calls > 2  # let the job start, then cancel during the denoising loop

    with pytest.raises(WorkerError) as info:
        sdxl.run(_request(params={"steps": 4}), None, cancelled)
    assert info.value.code is ErrorCode.CANCELLED
    assert sdxl.txt2img.interrupt
    # The engine stays usable: the next job runs normally (diffusers resets the flag per call).
    assert len(sdxl.run(_request(count=1)).images) == 1


@pytest.mark.parametrize("data", [base64.b64encode(b"not an image at all").decode(), "%%%not base64%%%"])
def test_corrupt_input_is_bad_input(sdxl: SDXLEngine, data: str) -> None:
    with pytest.raises(WorkerError) as info:
        sdxl.run(_request(JobKind.VARIATION, input_image=data))
    assert info.value.code is ErrorCode.BAD_INPUT


def test_missing_input_and_bad_parameters_are_bad_input(sdxl: SDXLEngine, source_image: Image.Image) -> None:
    for request in (
        _request(JobKind.UPSCALE, count=1),
        _request(JobKind.PAN, input_image=_b64(source_image)),  # no direction
        _request(JobKind.ZOOM, input_image=_b64(source_image), scale=0.5),
        _request(JobKind.SQUARE, input_image=_b64(source_image)),  # already square
        _request(JobKind.CROP),
    ):
        with pytest.raises(WorkerError) as info:
            sdxl.run(request)
        assert info.value.code is ErrorCode.BAD_INPUT, request.kind


# ---------------------------------------------------------- embeddings, LoRA, refiner, VAE


def test_textual_inversion_token_is_usable(sdxl_extras: SDXLEngine, embeddings_dir: Path) -> None:
    from safetensors.torch import load_file

    assert sdxl_extras.embedding_tokens == ["tinystyle"]  # the non-SDXL file is skipped
    vectors = load_file(str(embeddings_dir / "tinystyle.safetensors"))
    pipe = sdxl_extras.txt2img
    for tokenizer, encoder, key in (
        (pipe.tokenizer, pipe.text_encoder, "clip_l"),
        (pipe.tokenizer_2, pipe.text_encoder_2, "clip_g"),
    ):
        prompt = pipe.maybe_convert_prompt("a tinystyle lighthouse", tokenizer)
        ids = tokenizer(prompt).input_ids
        token_ids = tokenizer.convert_tokens_to_ids(["tinystyle", "tinystyle_1"])
        assert all(token_id in ids for token_id in token_ids)
        table = encoder.get_input_embeddings().weight
        assert torch.allclose(table[token_ids], vectors[key])
    with_token = _pixels(sdxl_extras.run(_request(count=1, params={"prompt": "a tinystyle lighthouse"})))
    without = _pixels(sdxl_extras.run(_request(count=1, params={"prompt": "a lighthouse"})))
    assert not np.array_equal(with_token[0], without[0])


def test_fp32_retry_decodes_with_the_jobs_padding_and_tiling(tiny_model_dir: Path) -> None:
    """An fp16 decode that overflows is redone on a kept fp32 copy of the VAE. The copy must
    follow the switches each job sets on the VAE: made during a --tile job it kept circular
    padding for every later retry, and made before one it ignored --tile (and VAE tiling)."""
    from diffusers import AutoencoderKL

    from workers.sdxl.jobs import circular_padding
    from workers.sdxl.vae import VaeRunner

    cpu = torch.device("cpu")
    vae = AutoencoderKL.from_pretrained(str(tiny_model_dir / "vae"))
    runner = VaeRunner(vae, device=cpu, model_dtype=torch.float16, mode="float16")
    # The copy is made from the fp16 weights: the reference gets the same rounding.
    reference = AutoencoderKL.from_pretrained(str(tiny_model_dir / "vae")).to(torch.float16).float()
    decoder = vae.decoder

    def overflow(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        # Only the fp16 original overflows; the hook, copied with the VAE, leaves the copy alone.
        return output * float("nan") if module is decoder else None

    decoder.register_forward_hook(overflow)
    latents = torch.randn(1, 4, 40, 40, generator=torch.Generator().manual_seed(0))
    unscaled = runner.unscale(latents).float()  # what the retry decodes

    def check(tiled: bool, vae_tiling: bool) -> None:
        with circular_padding([vae], tiled), circular_padding([reference], tiled), torch.no_grad():
            for model in (vae, reference):
                model.enable_tiling() if vae_tiling else model.disable_tiling()
            pixels = runner.decode(latents)
            assert torch.isfinite(pixels).all()
            assert torch.allclose(pixels, reference.decode(unscaled, return_dict=False)[0], atol=1e-5)

    check(tiled=True, vae_tiling=False)  # the copy is made here, during a --tile job
    check(tiled=False, vae_tiling=False)
    check(tiled=True, vae_tiling=True)  # an upscale's tiled decode of a --tile picture
    check(tiled=False, vae_tiling=False)
    assert runner.retries == 4


def test_refiner_and_separate_vae_are_used(sdxl_extras: SDXLEngine) -> None:
    assert sdxl_extras.refiner is not None
    assert sdxl_extras.refiner.vae is sdxl_extras.txt2img.vae
    assert sdxl_extras.refiner.text_encoder_2 is sdxl_extras.txt2img.text_encoder_2
    reports: list[Progress] = []
    result = sdxl_extras.run(_request(params={"steps": 5}), reports.append)
    assert sdxl_extras.last_info["refined"] is True and len(result.images) == 4
    assert reports[-1].percent == 100


@pytest.mark.parametrize("kind", [JobKind.IMAGINE, JobKind.VARIATION])
def test_tile_pads_the_refiner_circularly_too(
    sdxl_extras: SDXLEngine, source_image: Image.Image, kind: JobKind
) -> None:
    """The refiner denoises the last 20 % with a UNet of its own: with zero padding there the
    edges of a --tile picture stopped meeting."""
    refiner_unet = sdxl_extras.refiner.unet
    convs = [m for m in refiner_unet.modules() if isinstance(m, torch.nn.Conv2d) and m.padding != (0, 0)]
    seen: list[set[str]] = []
    handle = refiner_unet.register_forward_pre_hook(lambda *_: seen.append({c.padding_mode for c in convs}))
    extra = {"input_image": _b64(source_image)} if kind is JobKind.VARIATION else {}
    try:
        sdxl_extras.run(_request(kind, count=1, params={"tile": True, "steps": 5}, **extra))
    finally:
        handle.remove()
    assert sdxl_extras.last_info["refined"] is True
    assert seen and all(modes == {"circular"} for modes in seen)
    assert {conv.padding_mode for conv in convs} == {"zeros"}  # and only for that job


def test_lora_tags(sdxl_extras: SDXLEngine) -> None:
    assert parse_lora_tags("a cat <lora:ink:0.7>, <LORA:film> at night") == (
        "a cat , at night",
        {"ink": 0.7, "film": 1.0},
    )
    assert parse_lora_tags("no tags here") == ("no tags here", {})
    with pytest.raises(WorkerError):
        parse_lora_tags("<lora:ink:9>")
    with pytest.raises(WorkerError) as info:
        sdxl_extras.run(_request(params={"prompt": "a cat <lora:unknown:0.5>"}))
    assert info.value.code is ErrorCode.BAD_INPUT


def test_tile_grid_covers_with_overlap() -> None:
    boxes = tile_grid(80, 48, 32, 4)
    covered = np.zeros((48, 80), dtype=bool)
    for left, top, right, bottom in boxes:
        assert right - left == 32 and bottom - top == 32
        covered[top:bottom, left:right] = True
    assert covered.all()
    weights = ramp(0, 32, 80, 4)
    assert weights[0] == 1.0 and weights[-1] < 0.2  # the outer edge stays at full weight


def test_fused_qkv_keeps_outputs_and_costs_no_memory(tiny_model_dir: Path) -> None:
    """The GPU levers, checked on CPU: same UNet output, no second copy of the q/k/v weights."""
    from diffusers import StableDiffusionXLPipeline

    from workers.sdxl.loading import speed_up_for_gpu

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 32, 32, generator=gen)
    context = torch.randn(2, 77, 64, generator=gen)
    extra = {
        "text_embeds": torch.randn(2, 32, generator=gen),
        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2),
    }

    def unet_bytes() -> int:
        return sum(
            {
                p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in pipe.unet.parameters()
            }.values()
        )

    with torch.no_grad():
        before = pipe.unet(sample, 10, encoder_hidden_states=context, added_cond_kwargs=extra).sample
        size_before = unet_bytes()
        speed_up_for_gpu(pipe, fuse_qkv=True)
        after = pipe.unet(sample, 10, encoder_hidden_states=context, added_cond_kwargs=extra).sample
    assert any(type(p).__name__ == "FusedAttnProcessor2_0" for p in pipe.unet.attn_processors.values())
    assert torch.allclose(before, after, atol=1e-5)
    assert unet_bytes() == size_before


def test_every_pipeline_keeps_the_engine_dtype(tiny_model_dir: Path) -> None:
    """img2img and inpaint share the weights without casting them: ``from_pipe`` defaults to
    float32, which silently ran every GPU grid in fp32 (2.6x slower than plain diffusers)."""
    engine = SDXLEngine.load(_settings(tiny_model_dir, dtype="bfloat16"))
    assert engine.dtype == torch.bfloat16
    for pipe in (engine.txt2img, engine.img2img, engine.inpaint):
        for name in ("unet", "text_encoder", "text_encoder_2"):
            dtypes = {p.dtype for p in getattr(pipe, name).parameters()}
            assert dtypes == {torch.bfloat16}, (name, dtypes)
    assert engine.img2img.unet is engine.txt2img.unet is engine.inpaint.unet
