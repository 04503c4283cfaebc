"""The SDXL speed levers on the tiny model: each one keeps the output it must keep.

GPU-only effects (timings, kernels) are the benchmark's business (bench/bench_sdxl.py); here the
levers run their real code on the CPU and the tests check what does not depend on the device:
identical pixels where a lever only moves work, one VAE cast instead of one per call, fewer full
UNet evaluations in draft mode, the fewest upscale tiles, previews without waiting.
"""

from __future__ import annotations

import itertools
import os
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

import torch
from PIL import Image

from workers.imaging import encode_png
from workers.schema import (
    SDXL_BUCKETS,
    ErrorCode,
    GenerationParams,
    JobKind,
    JobRequest,
    Progress,
    ReferenceRole,
    WorkerError,
    b64encode_bytes,
)
from workers.sdxl import loading
from workers.sdxl.deepcache import DeepCacheUNet, draft_steps
from workers.sdxl.engine import Levers, SDXLEngine
from workers.sdxl.progress import PendingPreview, ProgressReporter, preview_jpeg
from workers.sdxl.tiles import fewest_tile_starts, fewest_tiles
from workers.sdxl.vae import choose_vae_dtype, to_images, to_uint8
from workers.settings import WorkerSettings


def _settings(model: Path, **overrides: Any) -> WorkerSettings:
    values: dict[str, Any] = {"sdxl_model": str(model), "warmup": False, **overrides}
    return WorkerSettings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # Two OpenMP threads on the shared CI cores spin-wait against other processes.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path, _one_thread: None) -> SDXLEngine:
    return SDXLEngine.load(_settings(tiny_model_dir))


@pytest.fixture
def fresh_levers(engine: SDXLEngine) -> Iterator[SDXLEngine]:
    """The engine with its levers and VAE precision restored after the test."""
    saved = Levers(**engine.levers.__dict__)
    vae_dtype = engine.vae.dtype
    yield engine
    engine.levers = saved
    engine.set_vae_dtype(str(vae_dtype).removeprefix("torch."))


def _request(kind: JobKind = JobKind.IMAGINE, **fields: Any) -> JobRequest:
    params = {"prompt": "a lighthouse at dusk", "steps": 4, **fields.pop("params", {})}
    return JobRequest(job_id="lever", kind=kind, params=GenerationParams(**params), seed=5, **fields)


def _pixels(images: list[Image.Image]) -> list[np.ndarray]:
    return [np.asarray(image) for image in images]


# ------------------------------------------------------------------------ postprocessing


def test_device_postprocess_gives_diffusers_exact_pixels(engine: SDXLEngine) -> None:
    gen = torch.Generator().manual_seed(3)
    # Beyond [-1, 1] on purpose: clamping must match too; and values at exact .5 steps.
    pixels = torch.rand(3, 3, 24, 40, generator=gen) * 2.4 - 1.2
    pixels[0, 0, 0, :8] = torch.tensor([-1.0, 1.0, 0.0, 1 / 255, -1 / 255, 0.5, -0.5, 2 / 255 - 1])
    ours = to_images(pixels, on_device=True)
    reference = to_images(pixels, on_device=False, image_processor=engine.txt2img.image_processor)
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(ours), _pixels(reference), strict=True))
    assert to_uint8(pixels).dtype == torch.uint8 and to_uint8(pixels).shape == (3, 24, 40, 3)


def test_postprocess_lever_keeps_every_pixel(fresh_levers: SDXLEngine) -> None:
    engine = fresh_levers
    engine.levers.gpu_postprocess = True
    on = engine.run(_request())
    engine.levers.gpu_postprocess = False
    off = engine.run(_request())
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(on.images), _pixels(off.images), strict=True))
    assert on.phases["postprocess"] > 0 and off.phases["postprocess"] > 0


# ----------------------------------------------------------------------------------- VAE


def test_vae_precision_choice() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert choose_vae_dtype("auto", device=cpu, model_dtype=torch.float32, fp16_safe=False) == torch.float32
    assert choose_vae_dtype("auto", device=cuda, model_dtype=torch.float16, fp16_safe=True) == torch.float16
    assert (
        choose_vae_dtype("bfloat16", device=cpu, model_dtype=torch.float32, fp16_safe=False) == torch.bfloat16
    )
    assert (
        choose_vae_dtype(" Float32 ", device=cuda, model_dtype=torch.float16, fp16_safe=True) == torch.float32
    )
    with pytest.raises(ValueError):
        choose_vae_dtype("int8", device=cpu, model_dtype=torch.float32, fp16_safe=True)


def test_vae_is_cast_once_never_per_job(fresh_levers: SDXLEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipelines' per-call upcast is off; img2img encodes go through the pre-hook instead."""
    engine = fresh_levers
    reference = engine.run(_request())
    assert engine.set_vae_dtype("bfloat16") == torch.bfloat16
    vae = engine.txt2img.vae
    assert {p.dtype for p in vae.parameters()} == {torch.bfloat16}
    assert vae.config.force_upcast is False
    casts: list[Any] = []
    real_to = vae.to
    monkeypatch.setattr(vae, "to", lambda *a, **k: casts.append((a, k)) or real_to(*a, **k))
    source = b64encode_bytes(encode_png(reference.images[0]))
    grid = engine.run(_request())
    variation = engine.run(_request(JobKind.VARIATION, input_image=source, strength=0.5))
    assert casts == []  # neither the decode nor the img2img encode recast the VAE
    assert len(variation.images) == 4
    # bf16 decodes what fp32 decodes, to within bf16's rounding.
    diff = np.abs(_pixels(grid.images)[0].astype(int) - _pixels(reference.images)[0].astype(int))
    assert diff.mean() < 2.0, diff.mean()


# ---------------------------------------------------------------------------------- draft


def test_deep_cache_full_step_is_the_unet_exactly(engine: SDXLEngine) -> None:
    unet = engine.txt2img.unet
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 25, 32, generator=gen)  # odd: the UNet forwards upsample sizes
    context = torch.randn(2, 77, 64, generator=gen)
    extra = {
        "text_embeds": torch.randn(2, 32, generator=gen),
        "time_ids": torch.tensor([[50.0, 64, 0, 0, 50, 64]] * 2),
    }
    with torch.no_grad():
        expected = unet(sample, 10, encoder_hidden_states=context, added_cond_kwargs=extra).sample
        cached = DeepCacheUNet(unet, interval=2)
        full = cached(sample, 10, encoder_hidden_states=context, added_cond_kwargs=extra).sample
        shallow = cached(
            sample, 10, encoder_hidden_states=context, added_cond_kwargs=extra, return_dict=False
        )[0]
    assert torch.allclose(full, expected, atol=1e-5)
    # Same inputs, so the cached deep features are exactly what a full pass would compute.
    assert torch.allclose(shallow, expected, atol=1e-5)
    assert (cached.full_evaluations, cached.shallow_evaluations) == (1, 1)


def test_draft_is_cheaper_and_different(fresh_levers: SDXLEngine) -> None:
    engine = fresh_levers
    deep_calls = 0

    def count(*_: Any) -> None:
        nonlocal deep_calls
        deep_calls += 1

    # The first up block is the deepest part of the UNet: it runs only in full evaluations.
    hook = engine.txt2img.unet.up_blocks[0].register_forward_pre_hook(count)
    try:
        full = engine.run(_request(params={"steps": 6}))
        full_calls, deep_calls = deep_calls, 0
        draft = engine.run(_request(params={"steps": 6, "draft": True}))
        draft_calls = deep_calls
    finally:
        hook.remove()
    assert full_calls == 6
    assert draft.report.steps == draft_steps(6) == 6
    assert draft_calls == engine.last_info["unet_full"] == 3 and engine.last_info["unet_shallow"] == 3
    assert len(draft.images) == 4 and draft.images[0].size == full.images[0].size
    assert not np.array_equal(_pixels(draft.images)[0], _pixels(full.images)[0])
    assert any("Draft" in note for note in draft.notes)
    assert engine.txt2img.unet is engine.img2img.unet  # the wrapper is gone after the call


def test_draft_steps() -> None:
    assert draft_steps(25) == 13 and draft_steps(50) == 25
    assert draft_steps(10) == 8 and draft_steps(4) == 4  # at least 8, never more than asked


# ------------------------------------------------------------------------------- upscale


def _minimal(length: int, max_tile: int, overlap: int, count: int) -> bool:
    """No fewer tiles of at most ``max_tile`` could cover ``length`` with that overlap."""
    return count == 1 or (count - 1) * max_tile - (count - 2) * overlap < length


@pytest.mark.parametrize(
    ("length", "max_tile", "overlap", "multiple"),
    list(itertools.product((40, 128, 136, 200, 256, 300, 384, 512), (40, 160), (4, 16), (8,))),
)
def test_fewest_tiles_cover_with_overlap(length: int, max_tile: int, overlap: int, multiple: int) -> None:
    tile, starts = fewest_tile_starts(length, max_tile, overlap, multiple)
    covered = np.zeros(length, dtype=int)
    for start in starts:
        covered[start : start + tile] += 1
    assert covered.min() >= 1 and starts[-1] + tile == length and starts[0] == 0
    assert tile <= max(max_tile, length if length <= max_tile else 0) and (
        tile % multiple == 0 or tile == length
    )
    assert all(b - a <= tile - min(overlap, tile - 1) for a, b in itertools.pairwise(starts))
    assert _minimal(length, max_tile, overlap, len(starts))


def test_sdxl_2x_upscale_takes_four_tiles_not_nine(engine: SDXLEngine, fresh_levers: SDXLEngine) -> None:
    """2048 px at SDXL's 8x VAE: 256 latent cells, 2 tiles of 136 a side (1088 px) instead of 3 of 128."""
    boxes = fewest_tiles(256, 256, 160, 16, 8)
    assert len(boxes) == 4 and {(right - left, bottom - top) for left, top, right, bottom in boxes} == {
        (136, 136)
    }
    # The tiny model is SDXL at 1/16 scale: the same 4 against 9.
    assert len(engine.upscale_tiles(128, 128)) == 4
    engine.levers.upscale_fewest_tiles = False
    assert len(engine.upscale_tiles(128, 128)) == 9


def test_upscale_with_the_fewest_tiles(fresh_levers: SDXLEngine) -> None:
    engine = fresh_levers
    source = Image.fromarray((np.indices((64, 64)).sum(0) % 256).astype(np.uint8)).convert("RGB")
    request = _request(JobKind.UPSCALE, input_image=b64encode_bytes(encode_png(source)), count=1)
    out = engine.run(request)
    assert engine.last_info["tiles"] == 4 and out.images[0].size == (128, 128)
    engine.levers.upscale_fewest_tiles = False
    base = engine.run(request)
    assert engine.last_info["tiles"] == 9 and base.images[0].size == (128, 128)


# ------------------------------------------------------------------------------- previews


def test_pending_preview_matches_the_host_preview() -> None:
    latents = torch.randn(4, 4, 20, 28, generator=torch.Generator().manual_seed(1))
    pending = PendingPreview(latents)
    assert pending.ready()  # on a CPU there is nothing to wait for
    assert pending.jpeg() == preview_jpeg(latents)


def test_previews_only_every_few_steps() -> None:
    seen: list[Progress] = []
    reporter = ProgressReporter("p", seen.append, interval_s=0.0, total_steps=8, preview_every=3)
    for index in range(8):
        reporter.step(index, 8, torch.zeros(4, 4, 8, 8))
    assert [bool(p.preview) for p in seen] == [True, False, False, True, False, False, True, False]
    seen.clear()
    host = ProgressReporter("p", seen.append, interval_s=0.0, total_steps=4, gpu_previews=False)
    for index in range(4):
        host.step(index, 4, torch.zeros(4, 4, 8, 8))
    assert all(p.preview for p in seen)


# ------------------------------------------------------------------ attention, compile, fp8


def test_attention_backend_names() -> None:
    with loading.attention_backend("flash", torch.device("cpu")):
        pass  # a CPU keeps PyTorch's own choice
    with pytest.raises(WorkerError) as info:
        loading.attention_backend("fastest", torch.device("cpu"))
    assert info.value.code is ErrorCode.ENGINE_UNAVAILABLE


def test_attention_shapes_cover_every_sdxl_transformer_layer() -> None:
    # SDXL base's published UNet configuration: 70 transformer layers in all.
    config = types.SimpleNamespace(
        block_out_channels=[320, 640, 1280],
        attention_head_dim=[5, 10, 20],
        transformer_layers_per_block=[1, 2, 10],
        layers_per_block=2,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        mid_block_type="UNetMidBlock2DCrossAttn",
    )
    shapes = loading.attention_shapes(types.SimpleNamespace(config=config), latent_side=128, batch=8)
    assert shapes == [
        (10, 8, 10, 4096, 4096, 64),
        (10, 8, 10, 4096, 77, 64),
        (60, 8, 20, 1024, 1024, 64),
        (60, 8, 20, 1024, 77, 64),
    ]


def test_measure_attention_keeps_pytorchs_choice_on_a_cpu(tiny_model_dir: Path) -> None:
    engine = SDXLEngine.load(_settings(tiny_model_dir, attention_backend="measure"))
    assert engine.levers.attention_backend == "auto" and engine.attention_times_ms == {}
    assert len(engine.run(_request(count=1)).images) == 1


def test_fp8_is_skipped_with_a_reason_on_a_cpu(tiny_model_dir: Path) -> None:
    engine = SDXLEngine.load(_settings(tiny_model_dir, fp8=True))
    assert engine.fp8_status != "applied" and "FP8 skipped" in engine.fp8_status
    assert len(engine.run(_request(count=1)).images) == 1


def test_compile_setup_is_lazy_static_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._dynamo.config as dynamo_config

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setattr(dynamo_config, "cache_size_limit", 8)
    pipe = types.SimpleNamespace(
        unet=torch.nn.Linear(2, 2), vae=types.SimpleNamespace(decoder=torch.nn.Linear(2, 2))
    )
    loading.enable_compile(pipe, tmp_path / "cache", mode="default", vae=True)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache") and (tmp_path / "cache").is_dir()
    assert dynamo_config.cache_size_limit >= len(SDXL_BUCKETS)  # no bucket falls back to eager
    assert pipe.unet._compiled_call_impl is not None and pipe.vae.decoder._compiled_call_impl is not None
    monkeypatch.setattr(pipe.unet, "_compiled_call_impl", None)
    monkeypatch.setattr(pipe.vae.decoder, "_compiled_call_impl", None)


@pytest.mark.skipif(
    os.environ.get("MIRAGE_COMPILE_TESTS") != "1",
    reason="Inductor compiles the tiny UNet and VAE in ~2 min on 2 CPU cores; MIRAGE_COMPILE_TESTS=1 runs it",
)
def test_compiled_grid_matches_eager(tiny_model_dir: Path, engine: SDXLEngine, tmp_path: Path) -> None:
    compiled = SDXLEngine.load(_settings(tiny_model_dir, torch_compile=True, compile_cache_dir=tmp_path))
    eager = _pixels(engine.run(_request()).images)
    got = _pixels(compiled.run(_request()).images)
    for a, b in zip(eager, got, strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2


def _block_compiled(model: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, **values: Any) -> SDXLEngine:
    """The tiny engine with COMPILE_SCOPE=blocks (UNet blocks only), its Inductor cache in ``cache``."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))  # restored after the test
    values.update(torch_compile=True, compile_scope="blocks", compile_vae=False, compile_cache_dir=cache)
    return SDXLEngine.load(_settings(model, **values))


def test_block_compiled_grid_matches_eager(
    tiny_model_dir: Path, engine: SDXLEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # COMPILE_SCOPE=blocks: only the transformer blocks, whole-graph; short enough to run always.
    compiled = _block_compiled(tiny_model_dir, tmp_path, monkeypatch)
    blocks = [m for m in compiled.txt2img.unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert blocks and all(block._compiled_call_impl is not None for block in blocks)
    assert compiled.txt2img.unet._compiled_call_impl is None  # the rest of the UNet stays eager
    eager = _pixels(engine.run(_request()).images)
    got = _pixels(compiled.run(_request()).images)
    for a, b in zip(eager, got, strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2


def test_a_new_image_weight_does_not_compile_the_unet_again(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The IP-Adapter's scales ride in its value weights under TORCH_COMPILE, so --iw 0.5, 0.75
    # and 1.5 share one compiled graph (without folding: one new graph per value).
    import torch._dynamo.utils as dynamo_utils

    from workers.tiny_extras import TINY_IP_SUBFOLDER, TINY_IP_WEIGHT_NAME, make_tiny_ip_adapter

    adapter_dir = make_tiny_ip_adapter(tmp_path / "ip", tiny_model_dir)
    compiled = _block_compiled(
        tiny_model_dir,
        tmp_path / "cache",
        monkeypatch,
        ip_adapter_model=str(adapter_dir),
        ip_adapter_subfolder=TINY_IP_SUBFOLDER,
        ip_adapter_weight_name=TINY_IP_WEIGHT_NAME,
    )
    picture = b64encode_bytes(encode_png(Image.new("RGB", (64, 64), (90, 30, 200))))

    def graphs_after(iw: float) -> int:
        params = GenerationParams(prompt="a fox", steps=2, image_weight=iw)
        request = JobRequest(
            job_id="iw", kind=JobKind.IMAGINE, params=params, seed=1, references={"prompt": [picture]}
        )
        assert len(compiled.run(request).images) == 4
        return int(dynamo_utils.counters["stats"]["unique_graphs"])

    first = graphs_after(1.0)
    assert [graphs_after(iw) for iw in (0.5, 0.75, 1.5)] == [first] * 3


def test_an_unknown_compile_scope_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"full.*blocks"):
        WorkerSettings(_env_file=None, compile_scope="everything")  # type: ignore[call-arg, arg-type]
    with pytest.raises(ValueError, match="full, blocks"):
        loading.enable_compile(types.SimpleNamespace(), None, scope="everything")


def test_warmup_covers_the_configured_buckets(tiny_model_dir: Path) -> None:
    def buckets(**values: Any) -> list[tuple[int, int]]:
        fake = types.SimpleNamespace(settings=_settings(tiny_model_dir, **values))
        return SDXLEngine.warmup_buckets(fake)  # type: ignore[arg-type]

    assert buckets() == [(1024, 1024)]  # no compile: one warm-up grid
    assert buckets(torch_compile=True, compile_warmup_aspects="1:1, 16:9,9:16,bogus,16:9") == [
        (1024, 1024),
        (1344, 768),
        (768, 1344),
    ]
    every = buckets(torch_compile=True, compile_warmup_aspects="all")
    assert every[0] == (1024, 1024) and sorted(every) == sorted(SDXL_BUCKETS)


def test_compiled_warm_up_runs_every_bucket_and_an_upscale(tiny_model_dir: Path) -> None:
    requests: list[JobRequest] = []
    fake = types.SimpleNamespace(
        settings=_settings(tiny_model_dir, torch_compile=True, compile_warmup_aspects="1:1,16:9"),
        base_resolution=64,
        run=requests.append,
        ip_adapter=None,
    )
    fake.warmup_buckets = lambda: SDXLEngine.warmup_buckets(fake)  # type: ignore[arg-type]
    SDXLEngine.warm_up(fake)  # type: ignore[arg-type]
    assert [(r.kind, r.params.width, r.params.height) for r in requests[:2]] == [
        (JobKind.IMAGINE, 1024, 1024),
        (JobKind.IMAGINE, 1344, 768),
    ]
    assert requests[2].kind is JobKind.UPSCALE and requests[2].input_image and len(requests) == 3
    # With an IP-Adapter loaded its processors compile too: one image prompt grid more.
    requests.clear()
    fake.ip_adapter = object()
    SDXLEngine.warm_up(fake)  # type: ignore[arg-type]
    assert len(requests) == 4 and requests[3].kind is JobKind.IMAGINE
    assert len(requests[3].reference_images(ReferenceRole.PROMPT)) == 1
