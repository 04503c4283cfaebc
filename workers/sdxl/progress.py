"""Progress reports for SDXL jobs: throttled percentages and a cheap latent preview.

The preview never touches the VAE: SDXL's four latent channels map to RGB almost linearly, so a
fixed 4x3 matrix (plus a bias) turns the current latents into a recognisable thumbnail for the
cost of one small matrix product. On a GPU that product runs where the latents are and its
uint8 result is copied to the host without waiting (:class:`PendingPreview`): the denoising loop
never stalls for a preview, which arrives with a later report instead.
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


def latents_to_rgb(latents: torch.Tensor) -> torch.Tensor:
    """``[B, h, w, 3]`` uint8 thumbnails of ``latents`` [B, 4, h, w], computed on their device."""
    weights = torch.tensor(SDXL_LATENT_RGB, dtype=torch.float32, device=latents.device)
    bias = torch.tensor(SDXL_LATENT_RGB_BIAS, dtype=torch.float32, device=latents.device)
    rgb = torch.einsum("bchw,cr->bhwr", latents.detach()[:, :4].float(), weights) + bias
    return ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def latents_to_images(latents: torch.Tensor) -> list[Image.Image]:
    """Approximate RGB thumbnails (one per batch item) of ``latents`` [B, 4, h, w]."""
    return [Image.fromarray(item) for item in latents_to_rgb(latents.detach().cpu()).numpy()]


def preview_jpeg(latents: torch.Tensor, side: int = PREVIEW_SIDE) -> str:
    """Base64 JPEG preview: each image's thumbnail scaled to ``side``, four of them as a 2x2 grid."""
    return thumbnails_jpeg(latents_to_images(latents[:4]), side)


def thumbnails_jpeg(thumbs: list[Image.Image], side: int = PREVIEW_SIDE) -> str:
    """Base64 JPEG of up to four thumbnails scaled to ``side``, four as a 2x2 grid."""
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


class PendingPreview:
    """A preview whose pixels are on their way from the GPU to the host.

    The projection runs on the latents' device and the uint8 result (a few hundred KiB at most)
    is copied into pinned memory with ``non_blocking``; an event marks when it has landed. On a
    CPU everything is done at once and the preview is ready immediately.
    """

    def __init__(self, latents: torch.Tensor) -> None:
        """Start the projection and copy of the first four images of ``latents``."""
        # Thumbnails never need more than PREVIEW_SIDE cells a side: pool on the device first.
        latents = latents.detach()[:4]
        factor = max(1, math.ceil(max(latents.shape[-2:]) / PREVIEW_SIDE))
        if factor > 1:
            latents = torch.nn.functional.avg_pool2d(latents.float(), factor)
        pixels = latents_to_rgb(latents)
        self._event: torch.cuda.Event | None = None
        if pixels.device.type == "cuda":
            self._host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
            self._host.copy_(pixels, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = pixels.cpu()

    def ready(self) -> bool:
        """True once the pixels are on the host (never blocks)."""
        return self._event is None or self._event.query()

    def jpeg(self) -> str:
        """The base64 JPEG preview; only call once :meth:`ready`."""
        return thumbnails_jpeg([Image.fromarray(item) for item in self._host.numpy()])


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
        preview_every: int = 1,
        gpu_previews: bool = True,
    ) -> None:
        self.job_id = job_id
        self.preview_every = max(1, preview_every)
        self.gpu_previews = gpu_previews
        self._pending: PendingPreview | None = None
        self._preview_step = -(10**9)  # overall step of the last preview started
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
        step = min(self.total_steps, self._steps_done + index + 1)
        self._emit(percent, step, self._preview(latents, step))

    def _preview(self, latents: torch.Tensor | None, step: int) -> str | None:
        """A finished preview to send now, if any; starts the next one every ``preview_every`` steps."""
        if latents is None:
            return None
        if not self.gpu_previews:
            # The reference path: project on the host now (a device sync on a GPU).
            return preview_jpeg(latents)
        ready = None
        if self._pending is not None and self._pending.ready():
            ready, self._pending = self._pending.jpeg(), None
        if self._pending is None and step - self._preview_step >= self.preview_every:
            self._pending = PendingPreview(latents)
            self._preview_step = step
            if ready is None and self._pending.ready():  # on a CPU: at once
                ready, self._pending = self._pending.jpeg(), None
        return ready

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
