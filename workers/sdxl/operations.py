"""SDXL operations that make a grid from a prompt and pictures: imagine, vary, blend, vary region.

- IMAGINE / REROLL: txt2img at the aspect bucket; with reference pictures
  (``JobRequest.references``) the IP-Adapter adds them, or, on a server without one, img2img
  from the image prompts (:func:`workers.image_prompts.fallback_plan`) with a note.
- VARIATION: img2img of the input at ``strength`` (0.5 subtle, 0.85 strong, default 0.85).
- BLEND: 2-5 pictures and no text. With the IP-Adapter their image embeddings are averaged into
  one and the grid is generated from it alone; without, the pictures are averaged and the
  average is the starting picture of an img2img pass (noted).
- REGION (Vary Region): the inpaint pipeline repaints the mask's white area of the input at
  strength ``0.95`` (``request.strength`` overrides) with the (edited) prompt, then everything
  outside the mask is pasted back, so only the region changes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from workers.image_input import decode_image, grow_mask, paste_outside, region_mask
from workers.image_prompts import (
    ImageInputs,
    blend_adapter_kwargs,
    fallback_plan,
    ip_adapter_kwargs,
    iw_scale,
)
from workers.schema import MAX_BLEND_IMAGES, ErrorCode, ReferenceRole, WorkerError, scale_bucket
from workers.sdxl.core import EngineCore
from workers.sdxl.jobs import Job, check_strength, circular_padding, steps_for_strength

VARY_STRENGTH = 0.85
REGION_STRENGTH = 0.95  # nearly a fresh start inside the region; 1.0 would ignore its colours
BLEND_SCALE = 1.0  # no text to balance against: the pictures alone steer the grid
BLEND_FALLBACK_STRENGTH = 0.65  # img2img of the averaged pictures keeps their layout
CHAOS_NOISE = 0.7
CHAOS_EMBED = 0.15
_CHAOS_SALT = 0x5EED_C4A0  # keeps the chaos streams independent of the seeds' own noise

BLEND_FALLBACK_NOTE = (
    "Blended by averaging the pictures: this server has no IP-Adapter (IP_ADAPTER_MODEL is not set)."
)


class Operations(EngineCore):
    """Grid operations from a prompt and pictures (mixed into ``SDXLEngine``)."""

    def _imagine(self, job: Job) -> list[Image.Image]:
        params = job.request.params
        count = max(1, job.request.count)
        width, height = scale_bucket(params.width, params.height, self.base_resolution)
        inputs = self._image_inputs(job)
        if not inputs.empty and self.ip_adapter is None:
            plan = fallback_plan(inputs, width, height)
            job.notes.extend(plan.notes)
            if plan.init_image is not None:
                job.info["fallback_strength"] = plan.strength
                return self._img2img(job, plan.init_image, plan.strength, count)
            inputs = ImageInputs()
        generators = self._generators(job.request.seed, count)
        kwargs: dict[str, Any] = {
            "height": height,
            "width": width,
            "num_inference_steps": job.steps,
            "guidance_scale": job.guidance,
            "generator": generators,
            **self._encode_prompt(job, count),
        }
        if params.chaos > 0:
            kwargs.update(self._chaos_inputs(job, count, width, height, generators, kwargs))
            job.info["chaos"] = params.chaos
        pipe = self.txt2img
        with self._tile_padding(pipe, params.tile), self._adapter(job, pipe, inputs, kwargs):
            return self._decode(job, self._denoise(pipe, job, kwargs, count=count))

    def _variation(self, job: Job) -> list[Image.Image]:
        source = self._fit_bucket(self._input_image(job))
        strength = check_strength(job.request.strength, VARY_STRENGTH)
        job.info["strength"] = strength
        inputs = self._image_inputs(job) if self.ip_adapter is not None else ImageInputs()
        return self._img2img(job, source, strength, max(1, job.request.count), inputs)

    def _img2img(
        self,
        job: Job,
        source: Image.Image,
        strength: float,
        count: int,
        inputs: ImageInputs | None = None,
        extra: dict[str, Any] | None = None,
    ) -> list[Image.Image]:
        """``count`` img2img images from ``source`` at ``strength`` (the adapter on for ``inputs``)."""
        kwargs: dict[str, Any] = {
            "image": source,
            "strength": strength,
            "num_inference_steps": steps_for_strength(job.steps, strength),
            "guidance_scale": job.guidance,
            "generator": self._generators(job.request.seed, count),
            **self._encode_prompt(job, count),
            **(extra or {}),
        }
        job.reporter.set_phases([1.0], total_steps=max(1, int(kwargs["num_inference_steps"] * strength)))
        pipe = self.img2img
        adapter = self._adapter(job, pipe, inputs or ImageInputs(), kwargs)
        with self._tile_padding(pipe, job.request.params.tile), adapter:
            return self._decode(job, self._denoise(pipe, job, kwargs, count=count))

    def _blend(self, job: Job) -> list[Image.Image]:
        pictures = self._references(job, ReferenceRole.PROMPT)
        if not 2 <= len(pictures) <= MAX_BLEND_IMAGES:
            raise WorkerError(
                ErrorCode.BAD_INPUT, f"A blend needs 2 to {MAX_BLEND_IMAGES} images, not {len(pictures)}."
            )
        params = job.request.params
        # /blend has no text: the pictures alone decide, so no prompt may pull the other way.
        job.text_params = params.model_copy(update={"prompt": "", "parts": ()})
        count = max(1, job.request.count)
        width, height = scale_bucket(params.width, params.height, self.base_resolution)
        job.info["blended"] = len(pictures)
        if self.ip_adapter is None:
            plan = fallback_plan(ImageInputs(prompt_images=tuple(pictures)), width, height)
            assert plan.init_image is not None
            job.notes.append(BLEND_FALLBACK_NOTE)
            return self._img2img(job, plan.init_image, BLEND_FALLBACK_STRENGTH, count)
        pipe = self.txt2img
        kwargs: dict[str, Any] = {
            "height": height,
            "width": width,
            "num_inference_steps": job.steps,
            "guidance_scale": job.guidance,
            "generator": self._generators(job.request.seed, count),
            **self._encode_prompt(job, count),
        }
        scale = iw_scale(params.image_weight) if params.image_weight is not None else BLEND_SCALE
        with self.ip_adapter.active():
            kwargs.update(blend_adapter_kwargs(pipe, pictures, scale, guidance=job.guidance > 1.0))
            return self._decode(job, self._denoise(pipe, job, kwargs, count=count))

    def _region(self, job: Job) -> list[Image.Image]:
        source = self._fit_bucket(self._input_image(job))
        if not job.request.mask_image:
            raise WorkerError(ErrorCode.BAD_INPUT, "Vary (Region) needs a mask of the area to repaint.")
        mask = region_mask(decode_image(job.request.mask_image, "the region mask"), source.size)
        strength = check_strength(job.request.strength, REGION_STRENGTH)
        count = max(1, job.request.count)
        feather = max(1, min(source.size) // 32)
        kwargs: dict[str, Any] = {
            "image": source,
            # A slightly grown mask lets the new content meet the kept pixels without a seam.
            "mask_image": grow_mask(mask, feather),
            "height": source.height,
            "width": source.width,
            "strength": strength,
            "num_inference_steps": steps_for_strength(job.steps, strength),
            "guidance_scale": job.guidance,
            "generator": self._generators(job.request.seed, count),
            **self._encode_prompt(job, count),
        }
        job.info.update(strength=strength, region=float(np.asarray(mask).mean() / 255))
        pipe = self.inpaint
        inputs = self._image_inputs(job) if self.ip_adapter is not None else ImageInputs()
        with self._adapter(job, pipe, inputs, kwargs):
            painted = self._decode(job, self._denoise(pipe, job, kwargs, count=count, refine=False))
        return [paste_outside(result, source, mask, feather) for result in painted]

    # ---------------------------------------------------------------------------- helpers

    def _tile_padding(self, pipe: Any, enabled: bool) -> AbstractContextManager[None]:
        """``--tile``'s circular padding for ``pipe``'s UNet and VAE and the refiner's UNet.

        The refiner finishes the images with a UNet of its own (its VAE is the shared one):
        padding it with zeros made the edges of a tiled picture stop meeting.
        """
        modules = [pipe.unet, pipe.vae]
        if self.refiner is not None:
            modules.append(self.refiner.unet)
        return circular_padding(modules, enabled)

    def _image_inputs(self, job: Job) -> ImageInputs:
        """The job's reference pictures by role, with the weights from its parameters."""
        return ImageInputs.from_params(
            job.request.params,
            prompt_images=self._references(job, ReferenceRole.PROMPT),
            style_images=self._references(job, ReferenceRole.STYLE),
            character_images=self._references(job, ReferenceRole.CHARACTER),
            omni_images=self._references(job, ReferenceRole.OMNI),
        )

    @contextmanager
    def _adapter(self, job: Job, pipe: Any, inputs: ImageInputs, kwargs: dict[str, Any]) -> Iterator[None]:
        """The IP-Adapter on for the block with ``inputs``' pictures in ``kwargs`` (nothing if none)."""
        if inputs.empty or self.ip_adapter is None:
            yield
            return
        with self.ip_adapter.active():
            kwargs.update(ip_adapter_kwargs(pipe, inputs))
            job.info["ip_adapter"] = {"content": inputs.content_scale(), "style": bool(inputs.style_images)}
            yield

    def _chaos_inputs(
        self,
        job: Job,
        count: int,
        width: int,
        height: int,
        generators: list[torch.Generator],
        embeds: dict[str, Any],
    ) -> dict[str, Any]:
        """Per-image starting noise and prompt embeddings, jittered in proportion to ``--chaos``."""
        amount = job.request.params.chaos / 100
        pipe = self.txt2img
        scale = self.vae_scale_factor
        channels = pipe.unet.config.in_channels
        shape = (count, channels, height // scale, width // scale)
        noise = randn_tensor(shape, generator=generators, device=torch.device("cpu"), dtype=torch.float32)
        chaos_gens = [
            torch.Generator("cpu").manual_seed((job.request.seed + index) ^ _CHAOS_SALT)
            for index in range(count)
        ]
        coarse_shape = (count, channels, max(1, shape[2] // 8), max(1, shape[3] // 8))
        coarse = randn_tensor(
            coarse_shape, generator=chaos_gens, device=torch.device("cpu"), dtype=torch.float32
        )
        coarse = torch.nn.functional.interpolate(coarse, size=shape[2:], mode="bilinear", align_corners=False)
        coarse = coarse / coarse.flatten(1).std(dim=1).clamp_min(1e-6).view(-1, 1, 1, 1)
        mix = CHAOS_NOISE * amount
        # Mixing two unit-variance fields with weights whose squares sum to 1 keeps unit variance,
        # which is what the scheduler's first step expects.
        latents = math.sqrt(1 - mix**2) * noise + mix * coarse
        prompt_embeds = embeds["prompt_embeds"]
        jitter = [
            torch.randn(prompt_embeds.shape[1:], generator=gen, dtype=torch.float32).to(prompt_embeds.device)
            for gen in chaos_gens
        ]
        # Each image's own spread: the batch's would tie image k to the others (--weird makes
        # them differ), and image k of a grid must be seed N+k run alone.
        sigma = CHAOS_EMBED * amount * prompt_embeds.float().flatten(1).std(dim=1).view(-1, 1, 1)
        return {
            "latents": latents.to(self.device, self.dtype),
            "prompt_embeds": prompt_embeds + (sigma * torch.stack(jitter)).to(prompt_embeds.dtype),
        }
