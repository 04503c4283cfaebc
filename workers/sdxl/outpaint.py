"""SDXL outpainting: Zoom Out (Custom Zoom included), Pan and Make Square.

Each builds a canvas (:mod:`workers.canvas`, or :func:`custom_zoom_canvas` here), inpaints its new
area at strength 1.0 and pastes the original back with a feathered seam.

Custom Zoom takes any factor from 1 to 2. When the job's ``--ar`` differs from the input's
shape, the canvas takes the new shape (the ``--ar`` bucket) with the input, shrunk by the factor,
in its centre, so a zoom of 1 with a new ``--ar`` only extends the picture to that shape.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from workers import canvas
from workers.schema import Direction, ErrorCode, WorkerError, nearest_bucket, scale_bucket
from workers.sdxl.core import EngineCore
from workers.sdxl.jobs import Job

ZOOM_SCALE = 2.0
MIN_ZOOM = 1.0
MAX_ZOOM = 2.0  # Midjourney's Custom Zoom range


class Outpainting(EngineCore):
    """Zoom, pan and square (mixed into ``SDXLEngine``)."""

    def _zoom(self, job: Job) -> list[Image.Image]:
        scale = job.request.scale if job.request.scale is not None else ZOOM_SCALE
        if not MIN_ZOOM <= scale <= MAX_ZOOM:
            raise WorkerError(
                ErrorCode.BAD_INPUT,
                f"Zoom out takes a factor from {MIN_ZOOM:g} to {MAX_ZOOM:g}, not {scale:g}.",
            )
        source = self._fit_bucket(self._input_image(job))
        aspect = job.request.params.aspect
        shape = scale_bucket(*nearest_bucket(*aspect), self.base_resolution)
        job.info["zoom"] = scale
        if shape == source.size:
            if scale == MIN_ZOOM:
                raise WorkerError(
                    ErrorCode.BAD_INPUT, "A zoom of 1 changes nothing unless --ar asks for a new shape."
                )
            image, mask = canvas.zoom_canvas(source, scale)
        else:
            image, mask = custom_zoom_canvas(source, scale, shape)
            job.info["zoom_aspect"] = f"{aspect[0]}:{aspect[1]}"
        return self._outpaint(job, image, mask)

    def _pan(self, job: Job) -> list[Image.Image]:
        direction = job.request.direction
        if direction is None:
            raise WorkerError(ErrorCode.BAD_INPUT, "Pan needs a direction.")
        source = self._fit_bucket(self._input_image(job))
        image, mask = canvas.pan_canvas(
            source, Direction(direction), multiple=self.size_multiple, max_side=2 * self.base_resolution
        )
        job.info["direction"] = str(direction)
        return self._outpaint(job, image, mask)

    def _square(self, job: Job) -> list[Image.Image]:
        source = self._input_image(job)
        image, mask = canvas.square_canvas(source, side=self.base_resolution, multiple=self.size_multiple)
        return self._outpaint(job, image, mask)

    def _outpaint(self, job: Job, image: Image.Image, mask: Image.Image) -> list[Image.Image]:
        """Inpaint the masked area of ``image`` at full strength, then paste the original back."""
        count = max(1, job.request.count)
        feather = canvas.feather_for(image.size)
        kwargs: dict[str, Any] = {
            "image": image,
            # Repaint a band of the original too, so the new area grows out of it seamlessly.
            "mask_image": canvas.inpaint_mask(mask, feather),
            "height": image.height,
            "width": image.width,
            "strength": 1.0,
            "num_inference_steps": job.steps,
            "guidance_scale": job.guidance,
            "generator": self._generators(job.request.seed, count),
            **self._encode_prompt(job, count),
        }
        painted = self._decode(job, self._denoise(self.inpaint, job, kwargs, count=count, refine=False))
        return [canvas.blend_seam(result, image, mask, feather) for result in painted]


def custom_zoom_canvas(
    image: Image.Image, scale: float, size: tuple[int, int]
) -> tuple[Image.Image, Image.Image]:
    """A ``size`` canvas with ``image`` fitted inside it, shrunk by ``1/scale``, centred.

    Returns ``(canvas, mask)`` as :mod:`workers.canvas` does: the new area pre-filled with the
    picture's edge colours, blurred, and a mask of 255 on the new area and 0 on the picture.
    """
    width, height = size
    fit = min(width / image.width, height / image.height) / scale
    inner_w = max(1, min(width, round(image.width * fit)))
    inner_h = max(1, min(height, round(image.height * fit)))
    left, top = (width - inner_w) // 2, (height - inner_h) // 2
    inner = image.convert("RGB").resize((inner_w, inner_h), Image.Resampling.LANCZOS)
    pixels = np.asarray(inner)
    # Clamp-to-edge, then a wide blur: the new area starts from the picture's colour mood only.
    rows = np.clip(np.arange(height) - top, 0, inner_h - 1)
    cols = np.clip(np.arange(width) - left, 0, inner_w - 1)
    stretched = Image.fromarray(np.ascontiguousarray(pixels[rows][:, cols]))
    filled = stretched.filter(ImageFilter.GaussianBlur(radius=max(2, max(size) // 24)))
    filled.paste(inner, (left, top))
    mask = Image.new("L", size, 255)
    mask.paste(0, (left, top, left + inner_w, top + inner_h))
    return filled, mask
