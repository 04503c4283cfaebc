"""Weighted multi-prompt conditioning and --weird on the tiny random SDXL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from workers.schema import GenerationParams, PromptPart  # noqa: E402
from workers.sdxl.conditioning import (  # noqa: E402
    Conditioning,
    apply_weird,
    encode_params,
    encode_weighted,
)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir: Path) -> Any:
    """The tiny SDXL loaded through the same call as a real checkpoint."""
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def parts(*items: tuple[str, float]) -> list[PromptPart]:
    return [PromptPart(text=text, weight=weight) for text, weight in items]


def test_one_part_matches_diffusers_own_encoding(pipe: Any) -> None:
    ours = encode_weighted(pipe, parts(("a red fox", 1.0)), "blurry")
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompt="a red fox",
        device="cpu",
        num_images_per_prompt=1,
        do_classifier_free_guidance=True,
        negative_prompt="blurry",
    )
    assert torch.allclose(ours.prompt_embeds, embeds, atol=1e-5)
    assert torch.allclose(ours.pooled_prompt_embeds, pooled, atol=1e-5)
    assert torch.allclose(ours.negative_prompt_embeds, negative, atol=1e-5)
    assert torch.allclose(ours.negative_pooled_prompt_embeds, negative_pooled, atol=1e-5)


def test_empty_negative_is_zeros_like_sdxl_base(pipe: Any) -> None:
    assert pipe.config.force_zeros_for_empty_prompt
    ours = encode_weighted(pipe, parts(("a red fox", 1.0)))
    assert not ours.negative_prompt_embeds.any() and not ours.negative_pooled_prompt_embeds.any()


def test_weights_change_both_encoders_and_the_pooled_embedding(pipe: Any) -> None:
    weighted = encode_weighted(pipe, parts(("castle", 0.75), ("fog", 0.25)))
    unweighted = encode_weighted(pipe, parts(("castle", 0.5), ("fog", 0.5)))
    hidden_1 = pipe.text_encoder.config.hidden_size
    sequence_gap = (weighted.prompt_embeds - unweighted.prompt_embeds).abs()
    assert sequence_gap[..., :hidden_1].max() > 1e-4  # first encoder's half
    assert sequence_gap[..., hidden_1:].max() > 1e-4  # second encoder's half
    assert not torch.allclose(weighted.pooled_prompt_embeds, unweighted.pooled_prompt_embeds)


def test_blend_is_the_weighted_sum_of_the_parts(pipe: Any) -> None:
    castle = encode_weighted(pipe, parts(("castle", 1.0)))
    fog = encode_weighted(pipe, parts(("fog", 1.0)))
    blend = encode_weighted(pipe, parts(("castle", 3.0), ("fog", 1.0)))  # normalised to 3/4, 1/4
    expected = 0.75 * castle.prompt_embeds + 0.25 * fog.prompt_embeds
    expected_pooled = 0.75 * castle.pooled_prompt_embeds + 0.25 * fog.pooled_prompt_embeds
    assert torch.allclose(blend.prompt_embeds, expected, atol=1e-5)
    assert torch.allclose(blend.pooled_prompt_embeds, expected_pooled, atol=1e-5)


def test_negative_part_moves_the_negative_side_only(pipe: Any) -> None:
    plain = encode_weighted(pipe, parts(("fruit bowl", 1.0)))
    with_negative = encode_weighted(pipe, parts(("fruit bowl", 1.0), ("apples", -0.5)))
    assert torch.equal(plain.prompt_embeds, with_negative.prompt_embeds)
    assert torch.equal(plain.pooled_prompt_embeds, with_negative.pooled_prompt_embeds)
    assert not torch.equal(plain.negative_prompt_embeds, with_negative.negative_prompt_embeds)
    assert not torch.equal(plain.negative_pooled_prompt_embeds, with_negative.negative_pooled_prompt_embeds)
    apples = encode_weighted(pipe, parts(("x", 1.0)), "apples")
    assert torch.allclose(with_negative.negative_prompt_embeds, apples.negative_prompt_embeds, atol=1e-6)


def test_negative_parts_blend_with_the_no_text(pipe: Any) -> None:
    only_no = encode_weighted(pipe, parts(("bowl", 1.0)), "text")
    both = encode_weighted(pipe, parts(("bowl", 1.0), ("apples", -1.0)), "text")
    assert torch.equal(only_no.prompt_embeds, both.prompt_embeds)
    assert not torch.allclose(only_no.negative_prompt_embeds, both.negative_prompt_embeds)


def test_emphasis_scales_tokens_and_weight_one_is_plain(pipe: Any) -> None:
    plain = encode_weighted(pipe, [PromptPart(text="a red fox")])
    neutral = encode_weighted(
        pipe, [PromptPart(text="a red fox", emphasis=(("a ", 1.0), ("red", 1.0), (" fox", 1.0)))]
    )
    strong = encode_weighted(
        pipe, [PromptPart(text="a red fox", emphasis=(("a ", 1.0), ("red", 1.5), (" fox", 1.0)))]
    )
    assert torch.allclose(plain.prompt_embeds, neutral.prompt_embeds, atol=1e-5)
    assert not torch.allclose(plain.prompt_embeds, strong.prompt_embeds, atol=1e-4)
    # rescaled to the original mean, as the Automatic1111 method does
    assert torch.allclose(plain.prompt_embeds.mean(), strong.prompt_embeds.mean(), atol=1e-5)


def test_encode_params_reads_parts_and_no(pipe: Any) -> None:
    params = GenerationParams(
        prompt="castle::3 fog::1", negative_prompt="text", parts=tuple(parts(("castle", 0.75), ("fog", 0.25)))
    )
    direct = encode_weighted(pipe, parts(("castle", 0.75), ("fog", 0.25)), "text")
    via_params = encode_params(pipe, params)
    assert torch.equal(direct.prompt_embeds, via_params.prompt_embeds)
    assert torch.equal(direct.negative_prompt_embeds, via_params.negative_prompt_embeds)
    plain = encode_params(pipe, GenerationParams(prompt="castle"))
    assert torch.equal(plain.prompt_embeds, encode_weighted(pipe, parts(("castle", 1.0))).prompt_embeds)


def distance(first: Conditioning, second: Conditioning, index: int) -> float:
    return float((first.prompt_embeds[index] - second.prompt_embeds[index]).norm())


def test_weird_zero_only_repeats(pipe: Any) -> None:
    base = encode_weighted(pipe, parts(("owl", 1.0)))
    off = apply_weird(base, 0, [7, 8, 9, 10])
    assert off.prompt_embeds.shape[0] == 4 and off.negative_pooled_prompt_embeds.shape[0] == 4
    for index in range(4):
        assert torch.equal(off.prompt_embeds[index], base.prompt_embeds[0])
        assert torch.equal(off.pooled_prompt_embeds[index], base.pooled_prompt_embeds[0])


def test_weird_is_deterministic_per_image_and_grows_with_n(pipe: Any) -> None:
    base = encode_weighted(pipe, parts(("owl", 1.0)))
    off = apply_weird(base, 0, [7, 8])
    low = apply_weird(base, 250, [7, 8])
    high = apply_weird(base, 3000, [7, 8])
    again = apply_weird(base, 250, [7, 8])
    assert torch.equal(low.prompt_embeds, again.prompt_embeds)
    assert not torch.equal(low.prompt_embeds[0], low.prompt_embeds[1])  # each image its own offset
    assert 0 < distance(low, off, 0) < distance(high, off, 0)
    assert torch.equal(high.negative_prompt_embeds, off.negative_prompt_embeds)
    with pytest.raises(ValueError, match="0 to 3000"):
        apply_weird(base, 3001, [1])


@pytest.mark.slow
def test_pipeline_accepts_the_conditioning(pipe: Any) -> None:
    conditioning = apply_weird(
        encode_weighted(pipe, parts(("castle", 2.0), ("fog", 1.0), ("people", -0.5))), 500, [1]
    )
    output = pipe(**conditioning.as_kwargs(), num_inference_steps=1, height=64, width=64, output_type="np")
    assert output.images.shape == (1, 64, 64, 3)
