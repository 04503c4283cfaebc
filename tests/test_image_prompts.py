"""Image prompts through IP-Adapter on the tiny SDXL, and the worker's input-image decoding.

A tiny random IP-Adapter (``workers.tiny_extras``) is written to disk in the layout of the real
``h94/IP-Adapter`` repository and loaded through the production code (diffusers'
``load_ip_adapter``) onto the tiny SDXL, itself loaded through the engine's ``from_pretrained``.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from workers.image_input import decode_image
from workers.image_prompts import (
    CONTENT_SLOT,
    STYLE_SLOT,
    ImageInputs,
    IPAdapter,
    character_scale,
    fallback_plan,
    fallback_strength,
    ip_adapter_kwargs,
    iw_scale,
    load_ip_adapter,
    missing_ip_adapter,
    omni_scale,
    set_scale,
    style_scale,
)
from workers.schema import ErrorCode, GenerationParams, WorkerError
from workers.settings import WorkerSettings
from workers.tiny_extras import TINY_IP_SUBFOLDER, TINY_IP_WEIGHT_NAME, make_tiny_ip_adapter

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SEED = 7
PROMPT = "a red fox in the snow"


def settings_for(folder: Path | None) -> WorkerSettings:
    """Worker settings pointing at a tiny IP-Adapter folder (or at none)."""
    return WorkerSettings(
        _env_file=None,  # type: ignore[call-arg]
        ip_adapter_model=str(folder) if folder else None,
        ip_adapter_subfolder=TINY_IP_SUBFOLDER,
        ip_adapter_weight_name=TINY_IP_WEIGHT_NAME,
    )


def reference(color: tuple[int, int, int], size: int = 64) -> Image.Image:
    """A reference picture: a colour field with a contrasting square, so the encoder sees structure."""
    image = Image.new("RGB", (size, size), color)
    image.paste(
        (255 - color[0], 255 - color[1], 255 - color[2]), (size // 4, size // 4, size // 2, size // 2)
    )
    return image


def generate(pipe: Any, **kwargs: Any) -> np.ndarray:
    """One 64 px, 2-step image for the fixed seed, as floats in [0, 1]."""
    generator = torch.Generator().manual_seed(SEED)
    out = pipe(
        PROMPT,
        num_inference_steps=2,
        height=64,
        width=64,
        generator=generator,
        output_type="np",
        **kwargs,
    )
    return np.asarray(out.images[0])


@dataclass
class Loaded:
    pipe: Any
    adapter: IPAdapter
    baseline: np.ndarray  # the image before any adapter was loaded


@pytest.fixture(scope="module")
def ip_adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random IP-Adapter matching the tiny SDXL, saved in the real repository layout."""
    return make_tiny_ip_adapter(tmp_path_factory.mktemp("tiny-ip-adapter"), tiny_model_dir)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path, ip_adapter_dir: Path) -> Iterator[Loaded]:
    """The tiny SDXL loaded through the engine's loader, then the tiny adapter through ours."""
    from diffusers import StableDiffusionXLPipeline

    from workers.sdxl.loading import from_pretrained

    pipe = from_pretrained(
        StableDiffusionXLPipeline, str(tiny_model_dir), dtype=torch.float32, gpu=False, what="SDXL_MODEL"
    )
    pipe.set_progress_bar_config(disable=True)
    baseline = generate(pipe)
    adapter = load_ip_adapter(pipe, settings_for(ip_adapter_dir))
    yield Loaded(pipe, adapter, baseline)


def test_iw_0_and_iw_2_give_different_images_for_the_same_seed(loaded: Loaded) -> None:
    pipe = loaded.pipe
    ref = reference((20, 200, 60))
    with loaded.adapter.active():
        assert set_scale(pipe, 0) == 0.0
        at_0 = generate(pipe, ip_adapter_image=[[ref], [ref]])
        assert set_scale(pipe, 2) == 0.8
        at_2 = generate(pipe, ip_adapter_image=[[ref], [ref]])
        again_2 = generate(pipe, ip_adapter_image=[[ref], [ref]])
    assert np.abs(at_0 - at_2).mean() > 1e-3
    np.testing.assert_array_equal(at_2, again_2)


def test_iw_0_is_the_image_without_any_adapter(loaded: Loaded) -> None:
    with loaded.adapter.active():
        kwargs = ip_adapter_kwargs(loaded.pipe, ImageInputs(prompt_images=(reference((200, 10, 10)),), iw=0))
        image = generate(loaded.pipe, **kwargs)
    np.testing.assert_allclose(image, loaded.baseline, atol=1e-6)


def test_switched_off_adapter_leaves_other_jobs_unchanged(loaded: Loaded) -> None:
    assert not loaded.adapter.is_active
    # No ip_adapter_image at all: the UNet must not expect image tokens while switched off.
    np.testing.assert_array_equal(generate(loaded.pipe), loaded.baseline)


def test_reference_picture_changes_the_result(loaded: Loaded) -> None:
    with loaded.adapter.active():
        green = generate(
            loaded.pipe, **ip_adapter_kwargs(loaded.pipe, ImageInputs((reference((0, 255, 0)),), iw=3))
        )
        blue = generate(
            loaded.pipe, **ip_adapter_kwargs(loaded.pipe, ImageInputs((reference((0, 0, 255)),), iw=3))
        )
    assert np.abs(green - loaded.baseline).mean() > 1e-3
    assert np.abs(green - blue).mean() > 1e-4


def test_style_reference_scales_only_the_style_block(loaded: Loaded) -> None:
    pipe = loaded.pipe
    inputs = ImageInputs(style_images=(reference((250, 200, 0)),), sw=100)
    with loaded.adapter.active():
        kwargs = ip_adapter_kwargs(pipe, inputs)
        processors = dict(pipe.unet.attn_processors)
        styled = generate(pipe, **kwargs)
    scaled = {name: proc.scale for name, proc in processors.items() if hasattr(proc, "scale")}
    assert scaled, "the adapter's processors should be installed while active"
    style_layers = {name for name, scale in scaled.items() if scale[STYLE_SLOT] != 0}
    assert style_layers == {name for name in scaled if name.startswith("up_blocks.0.attentions.1.")}
    assert all(scale[STYLE_SLOT] == 1.0 for name, scale in scaled.items() if name in style_layers)
    assert all(scale[CONTENT_SLOT] == 0 for scale in scaled.values())
    assert np.abs(styled - loaded.baseline).mean() > 1e-4


def test_content_and_style_together_use_both_slots(loaded: Loaded) -> None:
    pipe = loaded.pipe
    inputs = ImageInputs(
        prompt_images=(reference((0, 90, 200)),),
        character_images=(reference((90, 40, 20)),),
        style_images=(reference((250, 200, 0)), reference((0, 0, 0))),
        iw=1,
        cw=100,
        sw=1000,
    )
    with loaded.adapter.active():
        kwargs = ip_adapter_kwargs(pipe, inputs)
        processors = dict(pipe.unet.attn_processors)
        image = generate(pipe, **kwargs)
    assert [len(slot) for slot in kwargs["ip_adapter_image"]] == [2, 2]
    any_proc = next(proc for proc in processors.values() if hasattr(proc, "scale"))
    # --cw 100 maps to 0.8, stronger than --iw 1's 0.5: the stronger one wins.
    assert any_proc.scale[CONTENT_SLOT] == 0.8
    assert np.isfinite(image).all() and image.shape == (64, 64, 3)


def test_folded_scales_give_the_same_images(loaded: Loaded) -> None:
    # Under TORCH_COMPILE the scales ride in the value weights; the pictures must not change.
    pipe, adapter = loaded.pipe, loaded.adapter
    inputs = [
        ImageInputs((reference((0, 255, 0)),), iw=2),
        ImageInputs((reference((0, 0, 255)),), iw=0.5),
        ImageInputs(
            prompt_images=(reference((0, 90, 200)),), style_images=(reference((250, 200, 0)),), sw=300
        ),
    ]
    with adapter.active():
        plain = [generate(pipe, **ip_adapter_kwargs(pipe, one)) for one in inputs]
    adapter.fold = True
    try:
        folded = []
        for one in [*inputs, inputs[0]]:  # back to the first scale: rewritten from the original
            with adapter.active():
                kwargs = ip_adapter_kwargs(pipe, one)
                adapter.fold_scales()
                scales = {
                    s for proc in pipe.unet.attn_processors.values() for s in getattr(proc, "scale", [])
                }
                folded.append(generate(pipe, **kwargs))
            assert scales <= {0.0, 1.0}  # nothing left for a compiler to bake in but on and off
    finally:
        adapter.fold = False
        adapter.unfold()  # the module's other tests get the adapter's own weights back
    for a, b in zip([*plain, plain[0]], folded, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_weight_mappings() -> None:
    assert [iw_scale(w) for w in (0, 1, 2, 3)] == [0.0, 0.5, 0.8, 1.0]
    assert iw_scale(None) == 0.5 and iw_scale(1.5) == 0.65
    assert [style_scale(w) for w in (0, 50, 100, 1000)] == [0.0, 0.5, 1.0, 1.5]
    assert style_scale(None) == 1.0
    assert [character_scale(w) for w in (0, 50, 100)] == [0.4, 0.6, 0.8]
    assert [omni_scale(w) for w in (0, 100, 1000)] == [0.0, 0.7, 1.0]
    assert [fallback_strength(w) for w in (0, 1, 2, 3)] == [1.0, 0.8, 0.65, 0.5]


def test_inputs_take_weights_from_params() -> None:
    params = GenerationParams(
        prompt="x", image_weight=2, style_weight=300, character_weight=20, omni_weight=400
    )
    inputs = ImageInputs.from_params(params, prompt_images=[reference((1, 2, 3))])
    assert (inputs.iw, inputs.sw, inputs.cw, inputs.ow) == (2, 300, 20, 400)
    assert inputs.content_scale() == 0.8 and inputs.style_config() == 0.0
    assert ImageInputs().empty and ImageInputs().content_scale() == 0.0


def test_missing_adapter_names_the_setting() -> None:
    settings = settings_for(None)
    message = missing_ip_adapter(settings)
    assert message is not None and "IP_ADAPTER_MODEL is not set" in message
    assert "--sref" in message
    with pytest.raises(WorkerError) as info:
        load_ip_adapter(object(), settings)
    assert info.value.code is ErrorCode.ENGINE_UNAVAILABLE and "IP_ADAPTER_MODEL" in info.value.message


def test_unloadable_adapter_is_engine_unavailable(tiny_model_dir: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))
    with pytest.raises(WorkerError) as info:
        load_ip_adapter(pipe, settings_for(tmp_path))
    assert info.value.code is ErrorCode.ENGINE_UNAVAILABLE
    assert "could not be loaded" in info.value.message


def test_fallback_plan_blends_image_prompts_and_notes_the_rest() -> None:
    inputs = ImageInputs(
        prompt_images=(Image.new("RGB", (100, 50), (200, 0, 0)), Image.new("RGB", (30, 30), (0, 0, 100))),
        style_images=(reference((1, 1, 1)),),
        iw=2,
    )
    plan = fallback_plan(inputs, 64, 48)
    assert plan.init_image is not None and plan.init_image.size == (64, 48)
    assert plan.init_image.getpixel((10, 10)) == (100, 0, 50)
    assert plan.strength == 0.65
    assert any("--sref" in note for note in plan.notes)
    empty = fallback_plan(ImageInputs(character_images=(reference((1, 1, 1)),)), 64, 64)
    assert empty.init_image is None and empty.notes == (
        "--cref needs an IP-Adapter (IP_ADAPTER_MODEL) on this server and was ignored.",
    )


# --- decode_image ----------------------------------------------------------------------------


def _png(size: tuple[int, int], mode: str = "RGBA") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, (10, 20, 30, 255) if mode == "RGBA" else 0).save(out, "PNG")
    return out.getvalue()


def test_decode_image_accepts_base64_and_bytes() -> None:
    data = _png((12, 8))
    from_text = decode_image(base64.b64encode(data).decode("ascii"), "image 1")
    from_bytes = decode_image(data, "image 1")
    assert from_text.mode == from_bytes.mode == "RGB"
    assert from_text.size == (12, 8) and from_text.getpixel((0, 0)) == (10, 20, 30)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("not base64!", "Image 2 is not valid base64 data."),
        (b"definitely not a picture", "Image 2 is not a readable image."),
    ],
)
def test_decode_image_refuses_bad_input(data: bytes | str, message: str) -> None:
    with pytest.raises(WorkerError) as info:
        decode_image(data, "image 2")
    assert info.value.code is ErrorCode.BAD_INPUT and info.value.message == message


def test_decode_image_refuses_too_many_pixels() -> None:
    with pytest.raises(WorkerError, match=r"too many pixels \(64x64\)"):
        decode_image(_png((64, 64), "L"), "image 1", max_pixels=32 * 32)
