"""The upscaler: tiny random Real-ESRGAN files loaded by spandrel's real loader, and the Lanczos fallback.

The tiny models are saved in the published Real-ESRGAN key layout (``.safetensors``, and ``.pth``
with ``params_ema``), so spandrel detects the architecture from the keys exactly as it would a
downloaded model. Their own forward pass (``TinyRRDBNet``) is the independent reference.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from workers.schema import ErrorCode, WorkerError
from workers.settings import WorkerSettings
from workers.tiny_upscaler import TinyRRDBNet, make_tiny_upscaler
from workers.upscaler import (
    LANCZOS_NOTE,
    LOAD_FAILED_NOTE,
    LanczosUpscaler,
    ModelUpscaler,
    configured_upscaler,
    import_spandrel,
    load_upscaler,
    target_size,
)


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic random RGB image: every pixel differs, so every pixel is tested."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


@pytest.fixture(scope="module")
def spandrel_ready() -> None:
    """spandrel is an optional extra (``pip install .[upscaler]``); without it these tests skip."""
    try:
        import_spandrel()
    except WorkerError as exc:
        pytest.skip(exc.message)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory, spandrel_ready: None) -> dict[str, Path]:
    """Tiny Real-ESRGAN weight files: 2x and 4x, safetensors and pth, random and pointwise."""
    root = tmp_path_factory.mktemp("esrgan")
    return {
        "x2": make_tiny_upscaler(root, scale=2),
        "x4_pth": make_tiny_upscaler(root, scale=4, fmt="pth"),
        "x2_pointwise": make_tiny_upscaler(root / "pointwise_x2.safetensors", scale=2, pointwise=True),
        "x1": make_tiny_upscaler(root / "restore_x1.safetensors", scale=1),
    }


# --- Lanczos, always available --------------------------------------------------------------------


def test_lanczos_when_no_model_is_configured() -> None:
    """Without UPSCALER_MODEL the upscaler is Lanczos and says so to the member."""
    upscaler = configured_upscaler(WorkerSettings(_env_file=None))
    assert isinstance(upscaler, LanczosUpscaler)
    assert upscaler.note == LANCZOS_NOTE == "Upscaled with Lanczos; no AI upscaler configured."
    out = upscaler.upscale(noise(30, 20), 2)
    assert out.size == (60, 40) and out.mode == "RGB"
    assert upscaler.upscale(noise(30, 20), 1.5).size == (45, 30)
    assert upscaler.upscale_to(noise(30, 20, 1).convert("RGBA"), (64, 48)).size == (64, 48)


def test_unusable_model_falls_back_to_lanczos_with_its_own_note(tmp_path: Path) -> None:
    """A configured model that is missing keeps upscales working, with a note saying why."""
    settings = WorkerSettings(_env_file=None, upscaler_model=tmp_path / "missing.pth")
    upscaler = configured_upscaler(settings)
    assert isinstance(upscaler, LanczosUpscaler) and upscaler.note == LOAD_FAILED_NOTE


@pytest.mark.parametrize(
    ("name", "problem"), [("missing.pth", "does not exist"), ("weights.onnx", "weights file")]
)
def test_bad_paths_are_unavailable(tmp_path: Path, name: str, problem: str) -> None:
    """A missing file or an unknown extension is ENGINE_UNAVAILABLE with a one-line reason."""
    if name.endswith(".onnx"):
        (tmp_path / name).write_bytes(b"onnx")
    with pytest.raises(WorkerError) as info:
        load_upscaler(tmp_path / name)
    assert info.value.code is ErrorCode.ENGINE_UNAVAILABLE and problem in info.value.message


def test_target_size() -> None:
    """Sides are multiplied and rounded; a zero or negative factor is refused."""
    assert target_size((1024, 768), 2) == (2048, 1536)
    assert target_size((3, 3), 1.5) == (4, 4)
    with pytest.raises(ValueError):
        target_size((8, 8), 0)


# --- spandrel ------------------------------------------------------------------------------------


def test_spandrel_detects_the_tiny_real_esrgan(weights: dict[str, Path]) -> None:
    """spandrel reads the architecture, scale and size from the state-dict keys alone."""
    x2 = load_upscaler(weights["x2"])
    assert x2.descriptor.architecture.name == "ESRGAN"
    assert x2.scale == 2 and "unshuffle" in x2.descriptor.tags and "8nf" in x2.descriptor.tags
    x4 = load_upscaler(weights["x4_pth"])
    assert x4.descriptor.architecture.name == "ESRGAN" and x4.scale == 4
    assert x2.note is None  # a model did the work: nothing to tell the member


def test_output_matches_the_reference_network(weights: dict[str, Path]) -> None:
    """Loaded through spandrel, the model computes exactly what the reference forward pass does."""
    import torch

    image = noise(24, 20)
    out = load_upscaler(weights["x2"]).upscale(image, 2)
    assert out.size == (48, 40)
    reference = TinyRRDBNet.build(2)
    tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        expected = reference(tensor).clamp(0, 1)[0].permute(1, 2, 0).mul(255).round().byte().numpy()
    assert np.abs(pixels(out) - expected.astype(np.int16)).max() <= 1
    assert pixels(out).std() > 10  # a real picture of noise, not a flat grey


def test_bigger_model_scale_is_resized_to_the_factor(weights: dict[str, Path]) -> None:
    """A 4x model asked for 2x runs once and is resized down to exactly 2x."""
    upscaler = load_upscaler(weights["x4_pth"])
    out = upscaler.upscale(noise(24, 20), 2)
    assert out.size == (48, 40) and upscaler.calls == 1
    full = upscaler.run(noise(24, 20))
    assert full.size == (96, 80)
    assert np.array_equal(pixels(out), pixels(full.resize((48, 40), Image.Resampling.LANCZOS)))


def test_factor_beyond_the_model_scale_runs_it_again(weights: dict[str, Path]) -> None:
    """A 2x model asked for 4x runs twice; for 3x twice and then down to the exact size."""
    upscaler = load_upscaler(weights["x2"])
    assert upscaler.upscale(noise(12, 10), 4).size == (48, 40) and upscaler.calls == 2
    upscaler.calls = 0
    assert upscaler.upscale_to(noise(12, 10), (36, 30)).size == (36, 30) and upscaler.calls == 2


def test_large_images_go_through_in_tiles(weights: dict[str, Path]) -> None:
    """Above the tile size the model runs per tile, and the blended seams leave no trace.

    The pointwise model's pixels depend only on their own input pixel, so any error in placing or
    weighting the tiles would show as a difference from the whole-image run.
    """
    image = noise(44, 36, seed=3)
    tiled = load_upscaler(weights["x2_pointwise"], tile=16, overlap=4)
    whole = load_upscaler(weights["x2_pointwise"])
    a, b = tiled.upscale(image, 2), whole.upscale(image, 2)
    assert tiled.calls == 4 * 3 and whole.calls == 1  # 44 px in 4 overlapping tiles, 36 px in 3
    assert a.size == b.size == (88, 72)
    assert np.abs(pixels(a) - pixels(b)).max() <= 1


def test_runs_in_the_requested_dtype(weights: dict[str, Path]) -> None:
    """bfloat16 is used where the architecture supports it; the result is still the right image."""
    import torch

    upscaler = load_upscaler(weights["x2"], dtype=torch.bfloat16)
    assert upscaler.dtype == torch.bfloat16 and upscaler.device.type == "cpu"
    low = upscaler.upscale(noise(24, 20), 2)
    exact = load_upscaler(weights["x2"]).upscale(noise(24, 20), 2)
    assert low.size == (48, 40)
    assert np.abs(pixels(low) - pixels(exact)).mean() < 8


def test_configured_model_is_used(weights: dict[str, Path]) -> None:
    """UPSCALER_MODEL set to a good file gives the model upscaler, tile size from the settings."""
    settings = WorkerSettings(_env_file=None, upscaler_model=weights["x2"], upscaler_tile_px=128)
    upscaler = configured_upscaler(settings)
    assert isinstance(upscaler, ModelUpscaler) and upscaler.tile == 128


@pytest.mark.parametrize("tile", [64, 65])
def test_the_smallest_tile_the_settings_allow_loads_and_upscales(weights: dict[str, Path], tile: int) -> None:
    """UPSCALER_TILE_PX may be 64, but the fixed 32 px overlap must stay below half a tile:
    the ValueError that broke was no WorkerError, so the worker failed to start."""
    settings = WorkerSettings(_env_file=None, upscaler_model=weights["x2_pointwise"], upscaler_tile_px=tile)
    upscaler = configured_upscaler(settings)
    assert isinstance(upscaler, ModelUpscaler) and upscaler.tile == tile
    image = noise(150, 70, seed=5)
    whole = load_upscaler(weights["x2_pointwise"]).upscale(image, 2)
    assert np.abs(pixels(upscaler.upscale(image, 2)) - pixels(whole)).max() <= 1
    assert upscaler.calls > 1  # it did go through in tiles


def test_restoration_model_is_not_an_upscaler(weights: dict[str, Path]) -> None:
    """A 1x model loads in spandrel but is refused as an upscaler."""
    with pytest.raises(WorkerError) as info:
        load_upscaler(weights["x1"])
    assert info.value.code is ErrorCode.ENGINE_UNAVAILABLE and "not a super-resolution" in info.value.message


def test_unknown_weights_are_unavailable(tmp_path: Path, spandrel_ready: None) -> None:
    """A weights file of no architecture spandrel knows is ENGINE_UNAVAILABLE, not a traceback."""
    import torch

    path = tmp_path / "mystery.pth"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(WorkerError) as info:
        load_upscaler(path)
    assert info.value.code is ErrorCode.ENGINE_UNAVAILABLE and "could not be loaded" in info.value.message


def test_torchvision_stand_in_does_not_linger(spandrel_ready: None) -> None:
    """Without torchvision, spandrel imports through a stand-in that is gone afterwards.

    Only LaMa and RestoreFormer use it, and calling it says torchvision is needed.
    """
    import importlib
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: spandrel imported the real one")
    assert "torchvision" not in sys.modules
    lama = importlib.import_module("spandrel.architectures.LaMa.__arch.LaMa")
    with pytest.raises(RuntimeError, match="needs torchvision"):
        lama.rotate(None, 0.0)
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("torchvision")


# --- through the SDXL engine ----------------------------------------------------------------------


def _engine_upscale(model_dir: Path, **overrides: Any) -> tuple[Any, Any]:
    """Load the tiny SDXL (no warm-up) with ``overrides`` and run one 2x upscale of a 32 px image."""
    import base64
    import io

    import torch

    from workers.schema import GenerationParams, JobKind, JobRequest
    from workers.sdxl.engine import SDXLEngine

    settings = WorkerSettings(
        _env_file=None, sdxl_model=str(model_dir), warmup=False, device="cpu", **overrides
    )  # type: ignore[call-arg]
    buffer = io.BytesIO()
    noise(32, 32, 3).save(buffer, format="PNG")
    request = JobRequest(
        job_id="up",
        kind=JobKind.UPSCALE,
        params=GenerationParams(prompt="a fox", steps=2),
        seed=1,
        count=1,
        input_image=base64.b64encode(buffer.getvalue()).decode("ascii"),
    )
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared CI cores
    try:
        engine = SDXLEngine.load(settings)
        return engine, engine.run(request)
    finally:
        torch.set_num_threads(saved)


def test_engine_upscale_runs_the_configured_model(tiny_model_dir: Path, weights: dict[str, Path]) -> None:
    """UPSCALER_MODEL is loaded with the engine and enlarges the source before img2img: no note."""
    engine, output = _engine_upscale(tiny_model_dir, upscaler_model=weights["x2"])
    assert isinstance(engine.upscaler, ModelUpscaler)
    assert engine.upscaler.calls == 1
    assert engine.last_info["upscaler"] == weights["x2"].name
    assert output.notes == []
    assert output.images[0].size == (64, 64)
    assert output.phases["upscaler"] > 0


def test_engine_upscale_without_a_model_says_lanczos(tiny_model_dir: Path) -> None:
    """No UPSCALER_MODEL: Lanczos enlarges, and the member is told so in the result's notes."""
    engine, output = _engine_upscale(tiny_model_dir)
    assert isinstance(engine.upscaler, LanczosUpscaler)
    assert output.notes == [LANCZOS_NOTE]
    assert output.images[0].size == (64, 64)
