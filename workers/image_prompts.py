"""Image prompts for SDXL through diffusers' IP-Adapter: ``--iw``, ``--sref``, ``--cref``, ``--oref``.

An IP-Adapter turns a reference picture into four extra cross-attention tokens (through a CLIP
image encoder and a small projection) and adds, in every cross-attention layer, attention over
those tokens times a scale. Midjourney's image inputs map onto it like this:

- image prompts (URLs before the text) and ``/blend``: the whole adapter at ``iw_scale(--iw)``;
- ``--cref`` (character) and ``--oref`` (omni): the whole adapter too, at ``character_scale(--cw)``
  and ``omni_scale(--ow)``: a plain IP-Adapter cannot separate a face from its clothes, so
  ``--cw`` only makes the subject's pull weaker or stronger;
- ``--sref`` (style): only the style block (InstantStyle's finding: in SDXL the middle
  attention of the first up block carries style, not layout), at ``style_scale(--sw)``.

The adapter is loaded twice from the same file, as two "slots": slot 0 holds content images
(image prompts, ``--cref``, ``--oref``), slot 1 style images, so a job may combine both, each
with its own scale. That costs one more copy of the adapter's attention weights (about 0.7 GB
in fp16 for ``ip-adapter_sdxl``). A slot without images gets a blank picture at scale 0, which
diffusers skips entirely.

Loaded, the adapter stays switched off (the UNet's attention processors are the ones it had
before), so every other job runs exactly as without it; :meth:`IPAdapter.active` switches it on
around one generation.

Under ``TORCH_COMPILE`` the scales move into the weights (:meth:`IPAdapter.fold_scales`): a
processor's scale is a Python float, which the compiler bakes into its graph, so every new
``--iw``/``--sw`` value used to compile the UNet again (measured on the tiny model: one new graph
per value). Attention is linear in its values, so ``scale * attention(q, k, v)`` equals
``attention(q, k, scale * v)``: the value projection's weight is set to its original times the
scale and the processor's own scale to 1 (0 stays 0, which diffusers skips). Only those two
graphs remain, whatever the weights.

Without ``IP_ADAPTER_MODEL``, image prompts fall back to img2img from the first image (several
images are averaged first) with the denoising strength ``fallback_strength(--iw)``, and
``--sref`` / ``--cref`` / ``--oref`` are noted as ignored: see :func:`fallback_plan`.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from workers.schema import ErrorCode, GenerationParams, WorkerError
from workers.settings import WorkerSettings

log = logging.getLogger(__name__)

SLOTS = 2  # slot 0: content (image prompts, --cref, --oref); slot 1: style (--sref)
CONTENT_SLOT = 0
STYLE_SLOT = 1
DEFAULT_IW = 1.0
DEFAULT_SW = 100
DEFAULT_CW = 100
DEFAULT_OW = 100

# Piecewise-linear maps from Midjourney's weights to adapter scales. IP-Adapter's authors use
# about 0.5 to balance picture and text, and 1.0 for "mostly the picture"; --iw 1 (the default)
# is the balance, --iw 3 the picture.
IW_POINTS: tuple[tuple[float, float], ...] = ((0.0, 0.0), (1.0, 0.5), (2.0, 0.8), (3.0, 1.0))
# Style block scale: InstantStyle uses 1.0; past about 1.5 the style overcooks the picture.
SW_POINTS: tuple[tuple[float, float], ...] = ((0.0, 0.0), (100.0, 1.0), (1000.0, 1.5))
# --cw 0 in Midjourney keeps only the face; the closest a plain adapter gets is a weaker pull.
CW_POINTS: tuple[tuple[float, float], ...] = ((0.0, 0.4), (100.0, 0.8))
OW_POINTS: tuple[tuple[float, float], ...] = ((0.0, 0.0), (100.0, 0.7), (1000.0, 1.0))
# img2img fallback: the denoising strength for --iw. Higher --iw keeps more of the picture
# (less denoising); --iw 0 denoises everything, so the picture no longer matters.
FALLBACK_STRENGTH_POINTS: tuple[tuple[float, float], ...] = ((0.0, 1.0), (1.0, 0.8), (2.0, 0.65), (3.0, 0.5))


def _interpolate(points: Sequence[tuple[float, float]], x: float) -> float:
    xs = [p[0] for p in points]
    if x <= xs[0]:
        return points[0][1]
    if x >= xs[-1]:
        return points[-1][1]
    i = bisect.bisect_right(xs, x)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return round(y0 + (y1 - y0) * (x - x0) / (x1 - x0), 4)


def iw_scale(iw: float | None) -> float:
    """The adapter scale for ``--iw`` (0–3, default 1): 0, 0.5, 0.8, 1.0 at 0, 1, 2, 3, linear between."""
    return _interpolate(IW_POINTS, DEFAULT_IW if iw is None else iw)


def style_scale(sw: float | None) -> float:
    """The style block's scale for ``--sw`` (0–1000, default 100): 0 at 0, 1.0 at 100, 1.5 at 1000."""
    return _interpolate(SW_POINTS, DEFAULT_SW if sw is None else sw)


def character_scale(cw: float | None) -> float:
    """The adapter scale for ``--cw`` (0–100, default 100): 0.4 at 0 up to 0.8 at 100."""
    return _interpolate(CW_POINTS, DEFAULT_CW if cw is None else cw)


def omni_scale(ow: float | None) -> float:
    """The adapter scale for ``--ow`` (1–1000, default 100): 0.7 at 100, 1.0 at 1000."""
    return _interpolate(OW_POINTS, DEFAULT_OW if ow is None else ow)


def fallback_strength(iw: float | None) -> float:
    """img2img denoising strength when there is no IP-Adapter: 1.0, 0.8, 0.65, 0.5 at ``--iw`` 0–3."""
    return _interpolate(FALLBACK_STRENGTH_POINTS, DEFAULT_IW if iw is None else iw)


def style_scale_config(weight: float) -> dict[str, Any] | float:
    """diffusers' per-block scale for style only: the middle attention of the first up block."""
    if weight <= 0:
        return 0.0
    return {"up": {"block_0": [0.0, weight, 0.0]}}


@dataclass(frozen=True)
class ImageInputs:
    """The decoded reference pictures of one job and the weights that go with them."""

    prompt_images: tuple[Image.Image, ...] = ()
    style_images: tuple[Image.Image, ...] = ()
    character_images: tuple[Image.Image, ...] = ()
    omni_images: tuple[Image.Image, ...] = ()
    iw: float | None = None
    sw: float | None = None
    cw: float | None = None
    ow: float | None = None

    @classmethod
    def from_params(
        cls,
        params: GenerationParams,
        *,
        prompt_images: Sequence[Image.Image] = (),
        style_images: Sequence[Image.Image] = (),
        character_images: Sequence[Image.Image] = (),
        omni_images: Sequence[Image.Image] = (),
    ) -> ImageInputs:
        """Pictures as decoded by the caller, weights from the job's parameters."""
        return cls(
            prompt_images=tuple(prompt_images),
            style_images=tuple(style_images),
            character_images=tuple(character_images),
            omni_images=tuple(omni_images),
            iw=params.image_weight,
            sw=params.style_weight,
            cw=params.character_weight,
            ow=params.omni_weight,
        )

    @property
    def content_images(self) -> tuple[Image.Image, ...]:
        """What goes into the content slot: image prompts, then --cref, then --oref pictures."""
        return (*self.prompt_images, *self.character_images, *self.omni_images)

    @property
    def empty(self) -> bool:
        """Whether the job has no reference picture at all."""
        return not self.content_images and not self.style_images

    def content_scale(self) -> float:
        """One scale for the content slot: the strongest of the weights whose pictures are present."""
        scales = []
        if self.prompt_images:
            scales.append(iw_scale(self.iw))
        if self.character_images:
            scales.append(character_scale(self.cw))
        if self.omni_images:
            scales.append(omni_scale(self.ow))
        return max(scales, default=0.0)

    def style_config(self) -> dict[str, Any] | float:
        """The style slot's per-block scale (0 without style pictures)."""
        return style_scale_config(style_scale(self.sw)) if self.style_images else 0.0


def missing_ip_adapter(settings: WorkerSettings) -> str | None:
    """A member-facing sentence naming the missing setting, or None when an IP-Adapter is configured."""
    if settings.ip_adapter_model and settings.ip_adapter_weight_name:
        return None
    missing = "IP_ADAPTER_MODEL" if not settings.ip_adapter_model else "IP_ADAPTER_WEIGHT_NAME"
    return (
        f"This server has no IP-Adapter ({missing} is not set), so image prompts are used as a "
        "starting picture instead and --sref, --cref and --oref are ignored."
    )


@dataclass
class IPAdapter:
    """A loaded IP-Adapter that can be switched on for one generation and off again.

    ``plain_processors`` are the UNet's attention processors from before loading;
    ``ip_processors`` and ``projection`` are what ``pipe.load_ip_adapter`` installed.
    """

    pipe: Any
    plain_processors: dict[str, Any]
    ip_processors: dict[str, Any]
    projection: Any
    source: str
    is_active: bool = field(default=True)
    fold: bool = False  # scales into the value weights (set when the UNet is compiled)
    # The value projections' own weights (kept on the host) and the scale each now carries.
    _originals: dict[tuple[str, int], Any] = field(default_factory=dict, repr=False)
    _folded: dict[tuple[str, int], float] = field(default_factory=dict, repr=False)

    def fold_scales(self) -> None:
        """After ``set_ip_adapter_scale``: carry each scale in its ``to_v_ip`` weight instead.

        A no-op unless :attr:`fold` is set. Weights are rewritten only where the scale changed
        since the last job, from a host copy of the original, so nothing drifts.
        """
        if not self.fold:
            return
        import torch

        for name, processor in self.ip_processors.items():
            scales = getattr(processor, "scale", None)
            values = getattr(processor, "to_v_ip", None)
            if not isinstance(scales, list) or values is None:
                continue
            for slot, (scale, linear) in enumerate(zip(scales, values, strict=False)):
                if isinstance(scale, list) or scale == 0:
                    continue  # per-mask scales are not used here; 0 is skipped by diffusers
                key = (name, slot)
                if key not in self._originals:
                    self._originals[key] = linear.weight.detach().to("cpu", copy=True)
                if self._folded.get(key, 1.0) != float(scale):
                    with torch.no_grad():
                        linear.weight.copy_(self._originals[key].to(linear.weight.device) * float(scale))
                    self._folded[key] = float(scale)
                scales[slot] = 1.0

    def unfold(self) -> None:
        """Put the original value weights back (the scales are the processors' own again)."""
        import torch

        with torch.no_grad():
            for (name, slot), original in self._originals.items():
                weight = self.ip_processors[name].to_v_ip[slot].weight
                weight.copy_(original.to(weight.device))
        self._folded.clear()

    def activate(self) -> None:
        """Install the adapter's attention processors and image projection in the UNet."""
        unet = self.pipe.unet
        unet.set_attn_processor(dict(self.ip_processors))
        unet.encoder_hid_proj = self.projection
        self.is_active = True

    def deactivate(self) -> None:
        """Put the UNet back as it was before loading: no image tokens are expected or used."""
        unet = self.pipe.unet
        unet.set_attn_processor(dict(self.plain_processors))
        unet.encoder_hid_proj = None
        self.is_active = False

    @contextmanager
    def active(self) -> Iterator[IPAdapter]:
        """Switch the adapter on for the ``with`` block (one pipeline call), then off again."""
        self.activate()
        try:
            yield self
        finally:
            self.deactivate()

    def share_with(self, *pipes: Any) -> None:
        """Give pipelines built with ``from_pipe`` before loading the same image encoder."""
        for other in pipes:
            other.register_modules(
                image_encoder=self.pipe.image_encoder, feature_extractor=self.pipe.feature_extractor
            )


def load_ip_adapter(pipe: Any, settings: WorkerSettings) -> IPAdapter:
    """Load the configured IP-Adapter into ``pipe`` (twice: a content and a style slot), switched off.

    Uses diffusers' own ``pipe.load_ip_adapter(IP_ADAPTER_MODEL, subfolder=IP_ADAPTER_SUBFOLDER,
    weight_name=IP_ADAPTER_WEIGHT_NAME, image_encoder_folder=...)`` with a hub id or a local
    folder. ``IMAGE_ENCODER_MODEL`` unset means the ``image_encoder`` folder beside the weights;
    an existing local folder is loaded as the encoder on its own; anything else is a path
    inside the IP-Adapter repository (``models/image_encoder`` for the ViT-H SDXL adapters).

    Call it once the pipeline is on its device and after any QKV fusion, since the processors
    saved here are restored on every switch-off. Failures raise ``WorkerError(ENGINE_UNAVAILABLE)``.
    """
    missing = missing_ip_adapter(settings)
    if missing is not None:
        raise WorkerError(ErrorCode.ENGINE_UNAVAILABLE, missing)
    assert settings.ip_adapter_model is not None
    source = settings.ip_adapter_model
    local = Path(source).expanduser()
    if local.is_dir():
        source = str(local)
    subfolder = settings.ip_adapter_subfolder or None
    encoder_folder = settings.image_encoder_model or "image_encoder"
    try:
        encoder_dir = Path(encoder_folder).expanduser()
        if settings.image_encoder_model and encoder_dir.is_dir():
            from transformers import CLIPVisionModelWithProjection

            encoder = CLIPVisionModelWithProjection.from_pretrained(str(encoder_dir), dtype=pipe.dtype)
            # With an encoder already registered, diffusers does not look for one in the repo.
            pipe.register_modules(image_encoder=encoder.to(pipe.device))
        plain = dict(pipe.unet.attn_processors)
        pipe.load_ip_adapter(
            source,
            subfolder=[subfolder] * SLOTS,
            weight_name=[settings.ip_adapter_weight_name] * SLOTS,
            image_encoder_folder=encoder_folder,
        )
    except Exception as exc:  # every load failure means the same to the member
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise WorkerError(
            ErrorCode.ENGINE_UNAVAILABLE,
            f"IP-Adapter {settings.ip_adapter_model!r} could not be loaded: {reason}",
        ) from exc
    adapter = IPAdapter(
        pipe=pipe,
        plain_processors=plain,
        ip_processors=dict(pipe.unet.attn_processors),
        projection=pipe.unet.encoder_hid_proj,
        source=source,
    )
    adapter.deactivate()
    log.info("IP-Adapter loaded from %s (%s), %d slots", source, settings.ip_adapter_weight_name, SLOTS)
    return adapter


def set_scale(pipe: Any, iw: float | None) -> float:
    """Set the content slot to ``iw_scale(iw)`` and the style slot to 0; returns the scale set."""
    scale = iw_scale(iw)
    pipe.set_ip_adapter_scale([scale, 0.0])
    return scale


def ip_adapter_kwargs(pipe: Any, inputs: ImageInputs) -> dict[str, Any]:
    """Set the slots' scales for ``inputs`` and return the pipeline call's ``ip_adapter_image``.

    Works for the txt2img, img2img and inpaint SDXL pipelines alike. A slot without pictures
    gets one blank picture at scale 0, because diffusers wants an entry per loaded slot and
    skips a slot whose scale is 0.
    """
    pipe.set_ip_adapter_scale([inputs.content_scale(), inputs.style_config()])
    size = int(pipe.image_encoder.config.image_size)
    blank = Image.new("RGB", (size, size))
    content = list(inputs.content_images) or [blank]
    style = list(inputs.style_images) or [blank]
    return {"ip_adapter_image": [content, style]}


def blend_adapter_kwargs(
    pipe: Any, images: Sequence[Image.Image], scale: float, *, guidance: bool
) -> dict[str, Any]:
    """``/blend`` through the adapter: the pictures' image embeddings averaged into one.

    Sets the content slot to ``scale`` and the style slot to 0, and returns the pipeline call's
    ``ip_adapter_image_embeds`` (negative then positive halves when ``guidance`` is on, as
    diffusers expects). Averaging the embeddings, rather than giving the adapter every picture's
    tokens, is what makes one picture out of several.
    """
    import torch

    pipe.set_ip_adapter_scale([scale, 0.0])
    projection = pipe.unet.encoder_hid_proj.image_projection_layers[CONTENT_SLOT]
    from diffusers.models.embeddings import ImageProjection

    hidden = not isinstance(projection, ImageProjection)
    with torch.no_grad():
        embeds, negative = pipe.encode_image(list(images), pipe.device, 1, hidden)
    positive = embeds.mean(dim=0, keepdim=True)[None]  # (1, 1, ...): one picture for the batch
    negative = negative[:1][None]
    content = torch.cat([negative, positive]) if guidance else positive
    style = torch.zeros_like(content)  # the style slot is at scale 0: its embedding is unused
    return {"ip_adapter_image_embeds": [content, style]}


@dataclass(frozen=True)
class Fallback:
    """What to do without an IP-Adapter: img2img from ``init_image`` at ``strength``, or nothing."""

    init_image: Image.Image | None
    strength: float
    notes: tuple[str, ...]


def fallback_plan(inputs: ImageInputs, width: int, height: int) -> Fallback:
    """The img2img fallback for a job with reference pictures on a server without an IP-Adapter.

    Image prompts become the starting picture (several are averaged), cropped to ``width`` x
    ``height``, with denoising strength ``fallback_strength(--iw)``: 1.0, 0.8, 0.65, 0.5 at
    ``--iw`` 0, 1, 2, 3. Style, character and omni references have no equivalent and are noted.
    """
    notes = []
    for pictures, flag in (
        (inputs.style_images, "--sref"),
        (inputs.character_images, "--cref"),
        (inputs.omni_images, "--oref"),
    ):
        if pictures:
            notes.append(f"{flag} needs an IP-Adapter (IP_ADAPTER_MODEL) on this server and was ignored.")
    if not inputs.prompt_images:
        return Fallback(None, 1.0, tuple(notes))
    fitted = [
        ImageOps.fit(image.convert("RGB"), (width, height), Image.Resampling.LANCZOS)
        for image in inputs.prompt_images
    ]
    blended = fitted[0]
    for count, image in enumerate(fitted[1:], start=2):
        # Running mean: each new picture weighs 1/count, so all end up equal.
        blended = Image.blend(blended, image, 1.0 / count)
    notes.append(
        "Image prompts were used as the starting picture: this server has no IP-Adapter "
        "(IP_ADAPTER_MODEL is not set)."
    )
    return Fallback(blended, fallback_strength(inputs.iw), tuple(notes))
