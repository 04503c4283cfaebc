"""The VAE at a fixed precision, and latents to uint8 pixels on the device.

Diffusers' SDXL pipelines keep the VAE in the UNet's fp16 and, because SDXL's original VAE
overflows in fp16 (its config says ``force_upcast``), cast the whole VAE to fp32 and back around
every encode and decode: two weight casts and an fp32 decode per job. Here the VAE gets one
precision when the engine loads and keeps it:

- ``float16`` for a VAE that is safe in fp16 (an fp16-fix VAE: ``force_upcast`` false), or when
  asked for; a decode that still overflows (non-finite pixels) is redone once in fp32 with a
  copy made on first need and kept;
- ``bfloat16`` (fp32's range, fp16's speed) for the original VAE on GPUs that have it;
- ``float32``, the exact and slow reference.

``force_upcast`` is then cleared so the pipelines never recast, and a pre-hook casts whatever the
pipelines feed the encoder (the UNet's dtype) to the VAE's.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from PIL import Image

log = logging.getLogger(__name__)

VAE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def choose_vae_dtype(
    mode: str, *, device: torch.device, model_dtype: torch.dtype, fp16_safe: bool
) -> torch.dtype:
    """The VAE precision for ``mode`` (auto, float16, bfloat16, float32) on ``device``."""
    name = mode.strip().lower()
    if name in VAE_DTYPES:
        return VAE_DTYPES[name]
    if name != "auto":
        raise ValueError(f"unknown VAE dtype {mode!r} (auto, float16, bfloat16, float32)")
    if model_dtype == torch.float32:
        return torch.float32  # CPU: full precision everywhere
    if fp16_safe:
        return torch.float16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16  # with the fp32 retry on overflow


class VaeRunner:
    """Decodes latents with one VAE kept at one precision; optionally postprocesses on the device."""

    def __init__(
        self, vae: Any, *, device: torch.device, model_dtype: torch.dtype, mode: str = "auto"
    ) -> None:
        """Take ``vae`` (shared with the pipelines) and set its precision for ``mode``."""
        self.vae = vae
        self.device = device
        self.model_dtype = model_dtype
        # Read before set_dtype clears it: True means this VAE overflows in fp16.
        self._needs_fp32 = bool(getattr(vae.config, "force_upcast", False))
        self._fp32_copy: Any = None
        self.retries = 0
        vae.encoder.register_forward_pre_hook(self._cast_encoder_input)
        self.dtype = model_dtype
        self.set_dtype(mode)

    def set_dtype(self, mode: str) -> torch.dtype:
        """Cast the VAE once to the precision ``mode`` picks; returns it."""
        dtype = choose_vae_dtype(
            mode, device=self.device, model_dtype=self.model_dtype, fp16_safe=not self._needs_fp32
        )
        self.vae.to(dtype=dtype)
        # The pipelines upcast (per call) only when this is set; our dtype is already right.
        self.vae.register_to_config(force_upcast=False)
        self.dtype = dtype
        self._fp32_copy = None
        return dtype

    def _cast_encoder_input(self, module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        first = args[0]
        if isinstance(first, torch.Tensor) and first.dtype != self.dtype:
            return (first.to(self.dtype), *args[1:])
        return args

    def unscale(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents as the pipelines hold them to what the decoder takes, in the VAE's dtype."""
        vae = self.vae
        latents = latents.to(device=self.device, dtype=self.dtype)
        mean = getattr(vae.config, "latents_mean", None)
        std = getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean_t = torch.tensor(mean, device=latents.device, dtype=self.dtype).view(1, -1, 1, 1)
            std_t = torch.tensor(std, device=latents.device, dtype=self.dtype).view(1, -1, 1, 1)
            return latents * std_t / vae.config.scaling_factor + mean_t
        return latents / vae.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] (``[B, 3, H, W]``, on the device) for pipeline latents."""
        with torch.no_grad():
            pixels = self.vae.decode(self.unscale(latents), return_dict=False)[0]
            if self.dtype == torch.float16 and self._needs_fp32 and not torch.isfinite(pixels).all():
                # Rare with fp16 on SDXL's original VAE, and the image would be black: redo it.
                self.retries += 1
                if self._fp32_copy is None:
                    log.info("fp16 VAE decode overflowed; keeping an fp32 copy of the VAE for retries")
                    self._fp32_copy = copy.deepcopy(self.vae).to(dtype=torch.float32)
                _follow_switches(self._fp32_copy, self.vae)
                scaled = self.unscale(latents).float()
                pixels = self._fp32_copy.decode(scaled, return_dict=False)[0]
        return pixels


def _follow_switches(copy_vae: Any, vae: Any) -> None:
    """Give ``copy_vae`` the per-job switches ``vae`` has now: conv padding and VAE tiling.

    Jobs set them on the shared VAE only (``--tile``'s circular padding, an upscale's tiling).
    A copy kept as it was when made would carry a --tile job's padding into every later
    retry, and decode a --tile job made after it with plain padding.
    """
    for original, mirrored in zip(vae.modules(), copy_vae.modules(), strict=True):
        if isinstance(original, torch.nn.Conv2d):
            mirrored.padding_mode = original.padding_mode
    for switch in ("use_tiling", "use_slicing"):
        if hasattr(vae, switch):
            setattr(copy_vae, switch, getattr(vae, switch))


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` pixels in [-1, 1] to ``[B, H, W, 3]`` uint8, on the tensor's own device.

    The arithmetic is diffusers' postprocessing in fp32 and in the same order (denormalise, clamp,
    x255, round half to even), so on a CPU it gives exactly the pixels diffusers gives.
    """
    unit = (pixels.float() / 2 + 0.5).clamp(0, 1)
    return (unit * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def to_images(pixels: torch.Tensor, *, on_device: bool, image_processor: Any = None) -> list[Image.Image]:
    """PIL images for decoded pixels.

    ``on_device``: convert to uint8 where the pixels are and copy only those bytes to the host
    (a quarter of fp32's, no float work on the CPU). Otherwise diffusers' own CPU postprocessing
    (``image_processor.postprocess``), the reference path.
    """
    if on_device:
        array = to_uint8(pixels).cpu().numpy()
        return [Image.fromarray(item) for item in array]
    if image_processor is None:
        raise ValueError("the CPU path needs the pipeline's image processor")
    return list(image_processor.postprocess(pixels, output_type="pil"))
