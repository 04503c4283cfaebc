"""What each OpenAI image model accepts: sizes, batch size, response format, prompt length.

The Images API rejects anything outside these tables with a 400, so the engine maps a member's
aspect ratio and ``--quality`` onto them before sending instead of letting the request fail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from workers.schema import ErrorCode, WorkerError

Size = tuple[int, int]

DEFAULT_MODEL = "dall-e-3"
# dall-e-3 has no variation or edit endpoint; this model does those jobs instead (see engine.py).
EDIT_FALLBACK_MODEL = "gpt-image-1"


@dataclass(frozen=True)
class ModelSpec:
    """The request limits of one image model."""

    name: str
    sizes: tuple[Size, ...]  # generation sizes
    edit_sizes: tuple[Size, ...]  # images.edit sizes (empty: no edits)
    max_n: int  # images per request
    response_format: bool  # accepts ``response_format`` (GPT image models always return b64)
    prompt_limit: int  # characters
    variations: bool  # has the images.create_variation endpoint
    square_edits: bool  # edit input must be square
    family: str  # "dall-e-2", "dall-e-3" or "gpt-image": how quality and style map

    @property
    def edits(self) -> bool:
        """Whether the model can edit (inpaint / outpaint) an image."""
        return bool(self.edit_sizes)


_GPT_IMAGE_SIZES: tuple[Size, ...] = ((1024, 1024), (1536, 1024), (1024, 1536))
_DALLE2_SIZES: tuple[Size, ...] = ((1024, 1024), (512, 512), (256, 256))

MODELS: dict[str, ModelSpec] = {
    "dall-e-3": ModelSpec(
        name="dall-e-3",
        sizes=((1024, 1024), (1792, 1024), (1024, 1792)),
        edit_sizes=(),
        max_n=1,
        response_format=True,
        prompt_limit=4000,
        variations=False,
        square_edits=False,
        family="dall-e-3",
    ),
    "dall-e-2": ModelSpec(
        name="dall-e-2",
        sizes=_DALLE2_SIZES,
        edit_sizes=_DALLE2_SIZES,
        max_n=10,
        response_format=True,
        prompt_limit=1000,
        variations=True,
        square_edits=True,
        family="dall-e-2",
    ),
    "gpt-image-1": ModelSpec(
        name="gpt-image-1",
        sizes=_GPT_IMAGE_SIZES,
        edit_sizes=_GPT_IMAGE_SIZES,
        max_n=10,
        response_format=False,
        prompt_limit=32000,
        variations=False,
        square_edits=False,
        family="gpt-image",
    ),
}


def model_spec(name: str | None) -> ModelSpec:
    """The spec for ``name`` (``None``: the default model).

    Later GPT image models (``gpt-image-1.5``, ``gpt-image-2``…) share gpt-image-1's request
    shape, so they are accepted with its limits: an admin can move to a newer model by
    configuration alone when an older one is retired.
    """
    key = (name or DEFAULT_MODEL).strip().lower()
    if key in MODELS:
        return MODELS[key]
    if key.startswith(("gpt-image-", "chatgpt-image-")):
        return replace(MODELS["gpt-image-1"], name=key)
    raise WorkerError(
        ErrorCode.ENGINE_UNAVAILABLE,
        f"The OpenAI model {name!r} is not supported by Mirage; use dall-e-3, dall-e-2 or gpt-image-1.",
    )


def nearest_size(sizes: tuple[Size, ...], width: float, height: float) -> Size:
    """The allowed size whose aspect ratio is closest to ``width:height`` (log scale), largest on a tie."""
    target = math.log(width / height)
    return min(sizes, key=lambda wh: (round(abs(math.log(wh[0] / wh[1]) - target), 9), -wh[0] * wh[1]))


def size_text(size: Size) -> str:
    """``(1792, 1024)`` → ``"1792x1024"``, the API's spelling."""
    return f"{size[0]}x{size[1]}"


def quality_option(spec: ModelSpec, quality: float) -> str | None:
    """Midjourney's ``--quality`` mapped to the model's ``quality`` parameter (None: leave the default).

    dall-e-3 has standard/hd, GPT image models low/medium/high/auto, dall-e-2 nothing.
    """
    if spec.family == "dall-e-3":
        return "hd" if quality >= 2 else "standard"
    if spec.family == "gpt-image":
        if quality <= 0.25:
            return "low"
        if quality <= 0.5:
            return "medium"
        if quality >= 2:
            return "high"
    return None


def style_option(spec: ModelSpec, stylize: int, raw: bool = False) -> str | None:
    """dall-e-3's style: ``natural`` for ``--style raw`` or ``--stylize`` below 100, ``vivid`` above.

    At the default 100 nothing is sent, which is the API's own default (vivid). Other models
    have no style parameter (None).
    """
    if spec.family != "dall-e-3":
        return None
    if raw or stylize < 100:
        return "natural"
    return "vivid" if stylize > 100 else None
