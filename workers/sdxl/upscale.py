"""SDXL upscale: enlarge (``UPSCALER_MODEL`` or Lanczos), then img2img over overlapping tiles.

The enlarged picture is denoised in the fewest overlapping tiles (up to 1.25x the base side, 4
for a 2x of 1024 px, denoised as one batch) at ``strength`` (0.35 subtle, 0.55 creative), the
tiles' latents blended on the device and decoded at once with VAE tiling.
"""

from __future__ import annotations

import torch
from PIL import Image

from workers import canvas
from workers.schema import ErrorCode, WorkerError
from workers.sdxl.core import EngineCore
from workers.sdxl.jobs import Job, check_cancel, check_strength, steps_for_strength
from workers.sdxl.tiles import fewest_tiles, ramp, tile_grid
from workers.upscaler import Upscaler

UPSCALE_STRENGTH = 0.35
UPSCALE_FACTOR = 2.0
MAX_UPSCALE = 4.0
TILE_BATCH = 4  # upscale tiles per pipeline call: the same memory as a grid
MAX_TILE_FACTOR = 1.25  # upscale tiles may be this much larger than the base side (1280 px for SDXL)


class Upscaling(EngineCore):
    """The upscale operation (mixed into ``SDXLEngine``)."""

    upscaler: Upscaler

    def upscale_tiles(self, width: int, height: int) -> list[tuple[int, int, int, int]]:
        """Latent-cell boxes an upscale to ``width`` x ``height`` px is denoised in.

        With ``upscale_fewest_tiles`` the fewest equal tiles (up to 1.25x the base side) that
        cover the image with a blending overlap of 1/8 of the base side; otherwise base-size tiles
        at that overlap (9 instead of 4 for a 2x upscale of a 1024 px image).
        """
        scale = self.vae_scale_factor
        base = self.base_resolution // scale  # latent cells per base-size side
        overlap = max(1, base // 8)
        latent_w, latent_h = width // scale, height // scale
        if not self.levers.upscale_fewest_tiles:
            return tile_grid(latent_w, latent_h, base, overlap)
        multiple = max(1, self.size_multiple // scale)
        max_tile = int(base * MAX_TILE_FACTOR) // multiple * multiple
        return fewest_tiles(latent_w, latent_h, max_tile, overlap, multiple)

    def _upscale(self, job: Job) -> list[Image.Image]:
        source = self._input_image(job)
        factor = job.request.scale or UPSCALE_FACTOR
        if not 1.0 < factor <= MAX_UPSCALE:
            raise WorkerError(
                ErrorCode.BAD_INPUT, f"Upscale needs a factor above 1 and up to {MAX_UPSCALE:g}."
            )
        multiple = self.size_multiple
        target = (
            canvas.round_to(source.width * factor, multiple),
            canvas.round_to(source.height * factor, multiple),
        )
        if max(target) > 4 * self.base_resolution:
            raise WorkerError(ErrorCode.BAD_INPUT, "The image is too large to upscale further.")
        with self._phase(job, "upscaler"):
            enlarged = self.upscaler.upscale_to(source, target)
        if self.upscaler.note:
            job.notes.append(self.upscaler.note)
        job.info["upscaler"] = self.upscaler.name
        strength = check_strength(job.request.strength, UPSCALE_STRENGTH)
        steps = steps_for_strength(job.steps, strength)
        scale = self.vae_scale_factor
        latent_w, latent_h = target[0] // scale, target[1] // scale
        overlap = max(1, self.base_resolution // scale // 8)
        boxes = self.upscale_tiles(*target)
        chunks = [boxes[i : i + TILE_BATCH] for i in range(0, len(boxes), TILE_BATCH)]
        per_call = max(1, int(steps * strength))
        job.reporter.set_phases([len(chunk) for chunk in chunks], total_steps=per_call * len(chunks))
        job.info.update(strength=strength, tiles=len(boxes), upscaled_from=[source.width, source.height])
        pipe = self.img2img
        # Blending happens on the device: the tiles' latents never make a round trip to the host.
        total = torch.zeros((1, 4, latent_h, latent_w), dtype=torch.float32, device=self.device)
        weight = torch.zeros((1, 1, latent_h, latent_w), dtype=torch.float32, device=self.device)
        embeds: dict[str, torch.Tensor] = {}
        first = 0
        for chunk in chunks:
            if not embeds or embeds["prompt_embeds"].shape[0] != len(chunk):
                embeds = self._encode_prompt(job, len(chunk))
            crops = [enlarged.crop(tuple(edge * scale for edge in box)) for box in chunk]
            latents = self._call(
                pipe,
                job,
                {
                    "image": crops,
                    "strength": strength,
                    "num_inference_steps": steps,
                    "guidance_scale": job.guidance,
                    "generator": self._generators(job.request.seed + first, len(chunk)),
                    **embeds,
                },
            )
            first += len(chunk)
            for (left, top, right, bottom), latent in zip(chunk, latents.float(), strict=True):
                ramp_x = torch.tensor(ramp(left, right, latent_w, overlap), device=self.device)
                ramp_y = torch.tensor(ramp(top, bottom, latent_h, overlap), device=self.device)
                mix = (ramp_y[:, None] * ramp_x[None, :])[None, None]
                total[:, :, top:bottom, left:right] += latent[None] * mix
                weight[:, :, top:bottom, left:right] += mix
        blended = total / weight
        check_cancel(job.cancelled)
        # The whole upscaled latent is decoded at once; VAE tiling keeps that within memory.
        pipe.vae.enable_tiling()
        try:
            return self._decode(job, blended)
        finally:
            pipe.vae.disable_tiling()
