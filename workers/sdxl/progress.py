"""Progress reports for SDXL jobs: throttled percentages and a cheap latent preview.

The preview never touches the VAE: SDXL's four latent channels map to RGB almost linearly, so a
fixed 4x3 matrix (plus a bias) turns the current latents into a recognisable thumbnail for the
cost of one small matrix product.
"""

from __future__ import annotations

import base64
import io
import math
import time
from collections.abc import Callable, Sequence

import torch
from PIL import Image

from workers.schema import Progress

# Approximate linear map from SDXL latents (as the pipelines hold them, i.e. already multiplied
# by the VAE scaling factor) to RGB in [-1, 1]. These are the widely used community fits of
# SDXL's VAE decoder by least squares; rows are latent channels, columns R, G, B.
SDXL_LATENT_RGB = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.6140),
)
SDXL_LATENT_RGB_BIAS = (0.1084, -0.0175, -0.0011)
PREVIEW_SIDE = 128  # px, the long side of each image in the preview
PREVIEW_QUALITY = 70


def latents_to_images(latents: torch.Tensor) -> list[Image.Image]:
    """Approximate RGB thumbnails (one per batch item) of ``latents`` [B, 4, h, w]."""
    weights = torch.tensor(SDXL_LATENT_RGB, dtype=torch.float32)
    bias = torch.tensor(SDXL_LATENT_RGB_BIAS, dtype=torch.float32)
    rgb = torch.einsum("bchw,cr->bhwr", latents.detach().float().cpu()[:, :4], weights) + bias
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return [Image.fromarray(item) for item in pixels]


def preview_jpeg(latents: torch.Tensor, side: int = PREVIEW_SIDE) -> str:
    """Base64 JPEG preview: each image's thumbnail scaled to ``side``, four of them as a 2x2 grid."""
    thumbs = latents_to_images(latents[:4])
    first = thumbs[0]
    factor = side / max(first.size)
    size = (max(1, round(first.width * factor)), max(1, round(first.height * factor)))
    thumbs = [thumb.resize(size, Image.Resampling.BILINEAR) for thumb in thumbs]
    if len(thumbs) == 4:
        sheet = Image.new("RGB", (size[0] * 2, size[1] * 2))
        for index, thumb in enumerate(thumbs):
            sheet.paste(thumb, ((index % 2) * size[0], (index // 2) * size[1]))
    else:
        sheet = thumbs[0]
    buffer = io.BytesIO()
    sheet.save(buffer, format="JPEG", quality=PREVIEW_QUALITY)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class ProgressReporter:
    """Turns per-step pipeline callbacks into throttled :class:`Progress` reports.

    A job may run several pipeline calls (base then refiner, or one call per batch of upscale
    tiles); each is a *phase* with a weight, so the percentage grows smoothly across them. The
    first step is always reported (the member sees the job start at once), later ones at most
    every ``interval_s`` seconds, and :meth:`finish` always reports 100 %.
    """

    def __init__(
        self,
        job_id: str,
        sink: Callable[[Progress], None] | None,
        *,
        interval_s: float,
        total_steps: int,
        weights: Sequence[float] = (1.0,),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.job_id = job_id
        self.sink = sink
        self.interval_s = interval_s
        self.total_steps = max(1, total_steps)
        self.clock = clock
        total = sum(weights) or 1.0
        self._weights = [weight / total for weight in weights]
        self._phase = 0
        self._steps_done = 0  # steps finished in earlier phases
        self._last: float | None = None
        self.reports = 0

    def set_phases(self, weights: Sequence[float], total_steps: int | None = None) -> None:
        """Replace the phase weights (and the planned total) before the first phase starts."""
        total = sum(weights) or 1.0
        self._weights = [weight / total for weight in weights]
        if total_steps is not None:
            self.total_steps = max(1, total_steps)

    def step(self, index: int, steps_in_phase: int, latents: torch.Tensor | None) -> None:
        """Report step ``index`` (0-based) of the current phase, if the throttle allows."""
        if self.sink is None:
            return
        now = self.clock()
        if self._last is not None and now - self._last < self.interval_s:
            return
        self._last = now
        phase = min(self._phase, len(self._weights) - 1)
        fraction = sum(self._weights[:phase]) + self._weights[phase] * (index + 1) / max(1, steps_in_phase)
        percent = min(99, math.floor(100 * fraction))
        preview = preview_jpeg(latents) if latents is not None else None
        self._emit(percent, min(self.total_steps, self._steps_done + index + 1), preview)

    def end_phase(self, steps_in_phase: int) -> None:
        """Close the current phase after its pipeline call returned."""
        self._phase += 1
        self._steps_done += steps_in_phase

    def finish(self) -> None:
        """Report 100 %, unconditionally."""
        if self.sink is not None:
            self._emit(100, self.total_steps, None)

    def _emit(self, percent: int, step: int, preview: str | None) -> None:
        self.reports += 1
        assert self.sink is not None
        self.sink(
            Progress(
                job_id=self.job_id, percent=percent, step=step, total_steps=self.total_steps, preview=preview
            )
        )
