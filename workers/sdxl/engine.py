"""The SDXL engine: one warm set of weights per worker process serving every Mirage operation.

``SDXLEngine.load(settings)`` builds it once (the Celery task calls it in the worker child);
``engine.run(request, progress, cancelled)`` does one job. txt2img, img2img and inpainting are
three diffusers pipelines over the *same* modules (``from_pipe``), so they cost one model's memory.

Operations (``request.kind``):

- IMAGINE / REROLL: one batch of ``request.count`` (4) images, seeds ``seed..seed+3``, at the
  aspect bucket scaled to the model's base resolution.
- VARIATION: img2img of the input at ``strength`` (0.5 subtle, 0.85 strong, default 0.85).
- UPSCALE: Lanczos 2x, then img2img over overlapping base-size tiles at ``strength``
  (0.35 subtle, 0.55 creative), blended in latent space and decoded with VAE tiling.
- ZOOM / PAN / SQUARE: canvas from :mod:`workers.canvas`, inpainting at strength 1.0 over the
  new area, then the original pasted back with a feathered seam.

``--chaos`` (0..100) adds per-image variety on top of the different seeds, deterministically
per seed: each image's starting noise is mixed with a coarse (1/8-resolution, upsampled) noise
field of weight ``0.7 * chaos/100``, which moves big shapes and colour masses, and each image's
prompt embedding gets Gaussian jitter of ``0.15 * chaos/100`` of its spread, which nudges the
interpretation of the prompt. Both use generators seeded from the image's own seed, so a rerun
with the same seed and chaos gives the same pixels.

``--tile`` switches every Conv2d of the UNet and VAE to circular padding for the job (restored
afterwards), which makes the image wrap seamlessly; it applies to txt2img and variations.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from workers import canvas
from workers.imaging import decode_image, encode_png
from workers.schema import (
    GRID_SIZE,
    MAX_SEED,
    Direction,
    Engine,
    ErrorCode,
    ImageOut,
    JobKind,
    JobRequest,
    JobResult,
    Progress,
    Sampler,
    WorkerError,
    b64decode_text,
    nearest_bucket,
    scale_bucket,
)
from workers.schema import b64encode_bytes as to_base64
from workers.sdxl import loading
from workers.sdxl.progress import ProgressReporter
from workers.sdxl.prompt import parse_lora_tags
from workers.sdxl.tiles import ramp, tile_grid
from workers.settings import WorkerSettings

log = logging.getLogger(__name__)

REFINER_SWITCH = 0.8  # the base model denoises the first 80 % of the schedule, the refiner the rest
VARY_STRENGTH = 0.85
UPSCALE_STRENGTH = 0.35
UPSCALE_FACTOR = 2.0
MAX_UPSCALE = 4.0
ZOOM_SCALE = 2.0
TILE_BATCH = 4  # upscale tiles per pipeline call: the same memory as a grid
CHAOS_NOISE = 0.7
CHAOS_EMBED = 0.15
_CHAOS_SALT = 0x5EED_C4A0  # keeps the chaos streams independent of the seeds' own noise


class _QuietFp32CastWarning(logging.Filter):
    """Drop diffusers' "modules that should be kept in float32: []" warning.

    Diffusers logs it on every ``.to(dtype)`` even when the list is empty, and its own img2img
    and inpaint pipelines cast the VAE on every call, so a worker's log would fill with it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


def _scheduler_for(sampler: Sampler, config: Any) -> Any:
    """A fresh scheduler for ``sampler`` from the model's own scheduler config (betas, offsets)."""
    if sampler is Sampler.DPM:
        # DPM++ 2M Karras: the usual ~25-step SDXL sampler.
        return DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True
        )
    if sampler is Sampler.EULER:
        return EulerDiscreteScheduler.from_config(config)
    if sampler is Sampler.EULER_A:
        return EulerAncestralDiscreteScheduler.from_config(config)
    if sampler is Sampler.DDIM:
        return DDIMScheduler.from_config(config)
    if sampler is Sampler.DDPM:
        return DDPMScheduler.from_config(config)
    raise WorkerError(ErrorCode.BAD_INPUT, f"Unknown sampler {sampler!r}.")


def _steps_for_strength(steps: int, strength: float) -> int:
    """Steps to ask img2img for so that at least one denoising step runs at this strength."""
    return max(steps, math.ceil(1 / max(strength, 1e-3)))


@contextmanager
def circular_padding(modules: list[torch.nn.Module], enabled: bool) -> Iterator[None]:
    """Within the block, every padded Conv2d of ``modules`` pads circularly (seamless tiling)."""
    changed: list[tuple[torch.nn.Conv2d, str]] = []
    if enabled:
        for module in modules:
            for layer in module.modules():
                if isinstance(layer, torch.nn.Conv2d) and any(p > 0 for p in _padding(layer)):
                    changed.append((layer, layer.padding_mode))
                    layer.padding_mode = "circular"
    try:
        yield
    finally:
        for layer, mode in changed:
            layer.padding_mode = mode


def _padding(layer: torch.nn.Conv2d) -> tuple[int, ...]:
    padding = layer.padding
    return (0,) if isinstance(padding, str) else tuple(padding)


@dataclass
class _Job:
    """What one ``run`` works with, resolved from the request."""

    request: JobRequest
    prompt: str
    negative: str | None
    steps: int
    guidance: float
    reporter: ProgressReporter
    cancelled: Callable[[], bool] | None
    denoise_s: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class SDXLEngine:
    """A loaded SDXL model with its txt2img, img2img and inpaint pipelines sharing weights."""

    def __init__(
        self,
        txt2img: StableDiffusionXLPipeline,
        settings: WorkerSettings,
        *,
        device: torch.device,
        dtype: torch.dtype,
        refiner: StableDiffusionXLImg2ImgPipeline | None = None,
        embedding_tokens: list[str] | None = None,
        loras: dict[str, str] | None = None,
        lora_unavailable: str | None = None,
        load_s: float = 0.0,
    ) -> None:
        self.settings = settings
        self.device = device
        self.dtype = dtype
        self.txt2img = txt2img
        # from_pipe reuses the very same modules: no copy of the weights, one model in memory.
        self.img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(txt2img)
        self.inpaint = StableDiffusionXLInpaintPipeline.from_pipe(txt2img)
        self.refiner = refiner
        self.embedding_tokens = embedding_tokens or []
        self.loras = loras or {}
        self.lora_unavailable = lora_unavailable
        self.load_s = load_s
        self.progress_interval_s = settings.progress_interval_s
        self.clock: Callable[[], float] = time.monotonic  # injectable for tests
        self._scheduler_config = txt2img.scheduler.config
        self._refiner_scheduler_config = refiner.scheduler.config if refiner is not None else None
        self._active_loras: dict[str, float] = {}
        for pipe in self._pipelines():
            pipe.set_progress_bar_config(disable=True)

    # ----------------------------------------------------------------------------- loading

    @classmethod
    def load(cls, settings: WorkerSettings) -> SDXLEngine:
        """Load the model named by ``settings.sdxl_model`` (hub id or local folder) and warm it up.

        Raises ``WorkerError(ENGINE_UNAVAILABLE)`` with a one-line reason when it cannot load.
        """
        started = time.perf_counter()
        quiet = logging.getLogger("diffusers.models.modeling_utils")
        if not any(isinstance(f, _QuietFp32CastWarning) for f in quiet.filters):
            quiet.addFilter(_QuietFp32CastWarning())
        device, dtype = loading.resolve_device(settings)
        gpu = device.type == "cuda"
        if gpu:
            # TF32 for the fp32 parts (the upcast VAE decode): several times faster, same look.
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        components: dict[str, Any] = {}
        if settings.sdxl_vae:
            components["vae"] = loading.from_pretrained(
                AutoencoderKL, settings.sdxl_vae, dtype=dtype, gpu=gpu, what="VAE"
            )
        pipe = loading.from_pretrained(
            StableDiffusionXLPipeline,
            settings.sdxl_model,
            dtype=dtype,
            gpu=gpu,
            what="SDXL model",
            **components,
        )
        if not isinstance(pipe, StableDiffusionXLPipeline):
            raise WorkerError(
                ErrorCode.ENGINE_UNAVAILABLE, f"{settings.sdxl_model!r} is not an SDXL text-to-image model."
            )
        pipe.to(device)
        tokens = loading.load_embeddings(pipe, settings.embeddings_dir)
        loras, lora_unavailable = loading.load_loras(pipe, settings.loras_dir)
        refiner = None
        if settings.sdxl_refiner:
            # The refiner reuses the base's second text encoder and VAE, as SDXL was designed.
            refiner = loading.from_pretrained(
                StableDiffusionXLImg2ImgPipeline,
                settings.sdxl_refiner,
                dtype=dtype,
                gpu=gpu,
                what="SDXL refiner",
                text_encoder_2=pipe.text_encoder_2,
                vae=pipe.vae,
            )
            refiner.to(device)
        if gpu:
            # SDPA is diffusers' default attention processor on torch 2; nothing to switch on.
            loading.speed_up_for_gpu(pipe, fuse_qkv=not loras)
            if refiner is not None:
                refiner.unet.to(memory_format=torch.channels_last)
        if settings.torch_compile:
            loading.enable_compile(pipe, settings.compile_cache_dir)
            if refiner is not None:
                refiner.unet.compile(fullgraph=False, dynamic=False)
        if settings.upscaler_model:
            log.warning("UPSCALER_MODEL is not supported yet; upscales use Lanczos before the img2img pass")
        engine = cls(
            pipe,
            settings,
            device=device,
            dtype=dtype,
            refiner=refiner,
            embedding_tokens=tokens,
            loras=loras,
            lora_unavailable=lora_unavailable,
        )
        if settings.warmup:
            engine.warm_up()
        engine.load_s = time.perf_counter() - started
        log.info(
            "SDXL %s loaded on %s (%s) in %.1fs, base %dpx",
            settings.sdxl_model,
            device,
            str(dtype).removeprefix("torch."),
            engine.load_s,
            engine.base_resolution,
        )
        return engine

    def warm_up(self) -> None:
        """One short grid at the base size: allocator, cuDNN choices and any compile happen now."""
        base = self.base_resolution
        self.txt2img.scheduler = _scheduler_for(Sampler.DPM, self._scheduler_config)
        self.txt2img(
            prompt="warm-up",
            height=base,
            width=base,
            num_inference_steps=2,
            num_images_per_prompt=GRID_SIZE,
            generator=self._generators(0, GRID_SIZE),
        )

    # ------------------------------------------------------------------------- properties

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (8 for SDXL, 2 for the tiny model)."""
        return int(self.txt2img.vae_scale_factor)

    @property
    def base_resolution(self) -> int:
        """The model's native side: UNet sample size x VAE scale factor (1024 SDXL, 64 tiny)."""
        return int(self.txt2img.unet.config.sample_size) * self.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        """What every side must be a multiple of (as ``scale_bucket`` rounds: 64 at 1024, 16 tiny)."""
        return max(16, 64 * self.base_resolution // 1024)

    def _pipelines(self) -> list[Any]:
        pipes: list[Any] = [self.txt2img, self.img2img, self.inpaint]
        if self.refiner is not None:
            pipes.append(self.refiner)
        return pipes

    # ---------------------------------------------------------------------------------- run

    def run(
        self,
        request: JobRequest,
        progress: Callable[[Progress], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> JobResult:
        """Do one job and return its images (PNG, base64) with steps, sampler, sizes and timings.

        ``progress`` receives throttled reports (first step, then at most every
        ``progress_interval_s``, then 100 %). ``cancelled`` is polled every step; when it returns
        True the pipeline is interrupted and ``WorkerError(CANCELLED)`` raised. A corrupt input
        image raises ``WorkerError(BAD_INPUT)``; other exceptions propagate.
        """
        started = time.perf_counter()
        handlers: dict[JobKind, Callable[[_Job], list[Image.Image]]] = {
            JobKind.IMAGINE: self._imagine,
            JobKind.REROLL: self._imagine,
            JobKind.VARIATION: self._variation,
            JobKind.UPSCALE: self._upscale,
            JobKind.ZOOM: self._zoom,
            JobKind.PAN: self._pan,
            JobKind.SQUARE: self._square,
        }
        handler = handlers.get(request.kind)
        if handler is None:
            raise WorkerError(ErrorCode.BAD_INPUT, f"The SDXL engine does not run {request.kind} jobs.")
        _check_cancel(cancelled)
        params = request.params
        prompt, loras = parse_lora_tags(params.prompt)
        self._apply_loras(loras)
        job = _Job(
            request=request,
            prompt=prompt,
            negative=params.negative_prompt.strip() or None,
            steps=params.step_count,
            guidance=params.guidance_scale,
            reporter=ProgressReporter(
                request.job_id,
                progress,
                interval_s=self.progress_interval_s,
                total_steps=params.step_count,
                clock=self.clock,
            ),
            cancelled=cancelled,
        )
        images = handler(job)
        encode_started = time.perf_counter()
        outputs = [
            ImageOut(data=to_base64(encode_png(image)), width=image.width, height=image.height)
            for image in images
        ]
        job.reporter.finish()
        done = time.perf_counter()
        info: dict[str, Any] = {
            "engine": "sdxl",
            "model": self.settings.sdxl_model,
            "refiner": self.settings.sdxl_refiner if self.refiner is not None else None,
            "kind": str(request.kind),
            "steps": job.steps,
            "sampler": str(params.sampler),
            "guidance": job.guidance,
            "size": [images[0].width, images[0].height],
            "seeds": [(request.seed + index) % (MAX_SEED + 1) for index in range(len(images))],
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "loras": loras,
            **job.info,
            "timings": {
                "total_s": round(done - started, 3),
                "denoise_s": round(job.denoise_s, 3),
                "encode_s": round(done - encode_started, 3),
            },
        }
        if job.notes:
            info["notes"] = job.notes
        return JobResult(
            job_id=request.job_id, images=outputs, seed=request.seed, engine=Engine.SDXL, info=info
        )

    # ------------------------------------------------------------------------- operations

    def _imagine(self, job: _Job) -> list[Image.Image]:
        params = job.request.params
        count = max(1, job.request.count)
        width, height = scale_bucket(params.width, params.height, self.base_resolution)
        generators = self._generators(job.request.seed, count)
        kwargs: dict[str, Any] = {
            "height": height,
            "width": width,
            "num_inference_steps": job.steps,
            "guidance_scale": job.guidance,
            "generator": generators,
        }
        if params.chaos > 0:
            kwargs.update(self._chaos_inputs(job, count, width, height, generators))
            job.info["chaos"] = params.chaos
        else:
            kwargs.update(prompt=job.prompt, negative_prompt=job.negative, num_images_per_prompt=count)
        with circular_padding([self.txt2img.unet, self.txt2img.vae], params.tile):
            return self._denoise(self.txt2img, job, kwargs, count=count)

    def _variation(self, job: _Job) -> list[Image.Image]:
        count = max(1, job.request.count)
        source = self._fit_bucket(self._input_image(job))
        strength = _strength(job.request.strength, VARY_STRENGTH)
        job.info["strength"] = strength
        kwargs: dict[str, Any] = {
            "prompt": job.prompt,
            "negative_prompt": job.negative,
            "image": source,
            "strength": strength,
            "num_inference_steps": _steps_for_strength(job.steps, strength),
            "guidance_scale": job.guidance,
            "num_images_per_prompt": count,
            "generator": self._generators(job.request.seed, count),
        }
        job.reporter.set_phases([1.0], total_steps=max(1, int(kwargs["num_inference_steps"] * strength)))
        with circular_padding([self.img2img.unet, self.img2img.vae], job.request.params.tile):
            return self._denoise(self.img2img, job, kwargs, count=count)

    def _upscale(self, job: _Job) -> list[Image.Image]:
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
        if self.settings.upscaler_model:
            job.notes.append("ESRGAN upscaler not supported yet: Lanczos used")
        # TODO: run settings.upscaler_model (ESRGAN-class) here instead of Lanczos when configured.
        enlarged = source.resize(target, Image.Resampling.LANCZOS)
        strength = _strength(job.request.strength, UPSCALE_STRENGTH)
        steps = _steps_for_strength(job.steps, strength)
        scale = self.vae_scale_factor
        tile = self.base_resolution // scale  # latent cells per tile side
        overlap = max(1, tile // 8)
        latent_w, latent_h = target[0] // scale, target[1] // scale
        boxes = tile_grid(latent_w, latent_h, tile, overlap)
        chunks = [boxes[i : i + TILE_BATCH] for i in range(0, len(boxes), TILE_BATCH)]
        per_call = max(1, int(steps * strength))
        job.reporter.set_phases([len(chunk) for chunk in chunks], total_steps=per_call * len(chunks))
        job.info.update(strength=strength, tiles=len(boxes), upscaled_from=[source.width, source.height])
        pipe = self.img2img
        total = torch.zeros((1, 4, latent_h, latent_w), dtype=torch.float32)
        weight = torch.zeros((1, 1, latent_h, latent_w), dtype=torch.float32)
        first = 0
        for chunk in chunks:
            crops = [enlarged.crop(tuple(edge * scale for edge in box)) for box in chunk]
            latents = self._call(
                pipe,
                job,
                {
                    "prompt": [job.prompt] * len(chunk),
                    "negative_prompt": [job.negative] * len(chunk) if job.negative else None,
                    "image": crops,
                    "strength": strength,
                    "num_inference_steps": steps,
                    "guidance_scale": job.guidance,
                    "generator": self._generators(job.request.seed + first, len(chunk)),
                    "output_type": "latent",
                },
            )
            first += len(chunk)
            for (left, top, right, bottom), latent in zip(chunk, latents.float().cpu(), strict=True):
                ramp_x = torch.tensor(ramp(left, right, latent_w, overlap))
                ramp_y = torch.tensor(ramp(top, bottom, latent_h, overlap))
                mix = (ramp_y[:, None] * ramp_x[None, :])[None, None]
                total[:, :, top:bottom, left:right] += latent[None] * mix
                weight[:, :, top:bottom, left:right] += mix
        blended = total / weight
        _check_cancel(job.cancelled)
        # The whole upscaled latent is decoded at once; VAE tiling keeps that within memory.
        pipe.vae.enable_tiling()
        try:
            return self._decode(pipe, blended)
        finally:
            pipe.vae.disable_tiling()

    def _zoom(self, job: _Job) -> list[Image.Image]:
        scale = job.request.scale or ZOOM_SCALE
        source = self._fit_bucket(self._input_image(job))
        image, mask = canvas.zoom_canvas(source, scale)
        job.info["zoom"] = scale
        return self._outpaint(job, image, mask)

    def _pan(self, job: _Job) -> list[Image.Image]:
        direction = job.request.direction
        if direction is None:
            raise WorkerError(ErrorCode.BAD_INPUT, "Pan needs a direction.")
        source = self._fit_bucket(self._input_image(job))
        image, mask = canvas.pan_canvas(
            source, Direction(direction), multiple=self.size_multiple, max_side=2 * self.base_resolution
        )
        job.info["direction"] = str(direction)
        return self._outpaint(job, image, mask)

    def _square(self, job: _Job) -> list[Image.Image]:
        source = self._input_image(job)
        image, mask = canvas.square_canvas(source, side=self.base_resolution, multiple=self.size_multiple)
        return self._outpaint(job, image, mask)

    def _outpaint(self, job: _Job, image: Image.Image, mask: Image.Image) -> list[Image.Image]:
        """Inpaint the masked area of ``image`` at full strength, then paste the original back."""
        count = max(1, job.request.count)
        feather = canvas.feather_for(image.size)
        kwargs: dict[str, Any] = {
            "prompt": job.prompt,
            "negative_prompt": job.negative,
            "image": image,
            # Repaint a band of the original too, so the new area grows out of it seamlessly.
            "mask_image": canvas.inpaint_mask(mask, feather),
            "height": image.height,
            "width": image.width,
            "strength": 1.0,
            "num_inference_steps": job.steps,
            "guidance_scale": job.guidance,
            "num_images_per_prompt": count,
            "generator": self._generators(job.request.seed, count),
        }
        painted = self._denoise(self.inpaint, job, kwargs, count=count, refine=False)
        return [canvas.blend_seam(result, image, mask, feather) for result in painted]

    # ---------------------------------------------------------------------------- helpers

    def _denoise(
        self, pipe: Any, job: _Job, kwargs: dict[str, Any], *, count: int, refine: bool = True
    ) -> list[Image.Image]:
        """Run ``pipe`` (and the refiner for the last 20 % of the schedule, when there is one)."""
        if self.refiner is None or not refine:
            return list(self._call(pipe, job, kwargs))
        job.reporter.set_phases([REFINER_SWITCH, 1 - REFINER_SWITCH])
        latents = self._call(pipe, job, {**kwargs, "denoising_end": REFINER_SWITCH, "output_type": "latent"})
        refined = self._call(
            self.refiner,
            job,
            {
                "prompt": [job.prompt] * count,
                "negative_prompt": [job.negative] * count if job.negative else None,
                "image": latents,
                "denoising_start": REFINER_SWITCH,
                "num_inference_steps": kwargs["num_inference_steps"],
                "guidance_scale": job.guidance,
                "generator": kwargs["generator"],
            },
            refiner=True,
        )
        job.info["refined"] = True
        return list(refined)

    def _call(self, pipe: Any, job: _Job, kwargs: dict[str, Any], *, refiner: bool = False) -> Any:
        """One pipeline call with a fresh scheduler, progress and cancellation wired in."""
        config = self._refiner_scheduler_config if refiner else self._scheduler_config
        pipe.scheduler = _scheduler_for(job.request.params.sampler, config)
        reporter = job.reporter
        steps_seen = 0

        def on_step_end(pipeline: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            nonlocal steps_seen
            if job.cancelled is not None and job.cancelled():
                pipeline._interrupt = True  # diffusers' own stop flag, should the raise be caught
                raise WorkerError(ErrorCode.CANCELLED, "The job was cancelled.")
            steps_seen = index + 1
            reporter.step(index, pipeline.num_timesteps, tensors.get("latents"))
            return {}

        started = time.perf_counter()
        output = pipe(
            **kwargs, callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"]
        )
        job.denoise_s += time.perf_counter() - started
        reporter.end_phase(steps_seen)
        _check_cancel(job.cancelled)
        return output.images

    def _decode(self, pipe: Any, latents: torch.Tensor) -> list[Image.Image]:
        """Latents (as the pipelines return them) to images, upcasting the VAE like diffusers does."""
        vae = pipe.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            vae.to(dtype=torch.float32)
        try:
            dtype = next(iter(vae.post_quant_conv.parameters())).dtype
            latents = latents.to(device=self.device, dtype=dtype)
            mean = getattr(vae.config, "latents_mean", None)
            std = getattr(vae.config, "latents_std", None)
            if mean is not None and std is not None:
                mean_t = torch.tensor(mean, device=latents.device, dtype=dtype).view(1, 4, 1, 1)
                std_t = torch.tensor(std, device=latents.device, dtype=dtype).view(1, 4, 1, 1)
                latents = latents * std_t / vae.config.scaling_factor + mean_t
            else:
                latents = latents / vae.config.scaling_factor
            with torch.inference_mode():
                decoded = vae.decode(latents, return_dict=False)[0]
        finally:
            if upcast:
                vae.to(dtype=torch.float16)
        return list(pipe.image_processor.postprocess(decoded, output_type="pil"))

    def _chaos_inputs(
        self, job: _Job, count: int, width: int, height: int, generators: list[torch.Generator]
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
        with torch.inference_mode():
            embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
                prompt=job.prompt,
                device=self.device,
                num_images_per_prompt=count,
                do_classifier_free_guidance=job.guidance > 1.0,
                negative_prompt=job.negative,
            )
        jitter = [
            torch.randn(embeds.shape[1:], generator=gen, dtype=torch.float32).to(embeds.device)
            for gen in chaos_gens
        ]
        sigma = CHAOS_EMBED * amount * embeds.float().std()
        embeds = embeds + (sigma * torch.stack(jitter)).to(embeds.dtype)
        return {
            "latents": latents.to(self.device, self.dtype),
            "prompt_embeds": embeds,
            "negative_prompt_embeds": negative,
            "pooled_prompt_embeds": pooled,
            "negative_pooled_prompt_embeds": negative_pooled,
        }

    def _generators(self, seed: int, count: int) -> list[torch.Generator]:
        """One CPU generator per image (seed, seed+1, ...): identical noise on any device."""
        return [torch.Generator("cpu").manual_seed((seed + index) % (MAX_SEED + 1)) for index in range(count)]

    def _input_image(self, job: _Job) -> Image.Image:
        data = job.request.input_image
        if not data:
            raise WorkerError(ErrorCode.BAD_INPUT, f"A {job.request.kind} job needs an input image.")
        try:
            raw = b64decode_text(data)
        except ValueError as exc:  # binascii.Error is a ValueError
            raise WorkerError(ErrorCode.BAD_INPUT, "The input image is not valid base64.") from exc
        return decode_image(raw)

    def _fit_bucket(self, image: Image.Image) -> Image.Image:
        """``image`` at the model's bucket for its aspect (unchanged when it already is one)."""
        size = scale_bucket(*nearest_bucket(image.width, image.height), self.base_resolution)
        return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)

    def _apply_loras(self, wanted: dict[str, float]) -> None:
        """Activate exactly the LoRAs a prompt names, at its weights; all off when it names none."""
        if wanted:
            if not self.loras:
                reason = self.lora_unavailable or "no LoRAs are installed on this worker"
                raise WorkerError(ErrorCode.BAD_INPUT, f"LoRA tags cannot be used: {reason}.")
            unknown = sorted(set(wanted) - set(self.loras))
            if unknown:
                raise WorkerError(
                    ErrorCode.BAD_INPUT,
                    f"Unknown LoRA {', '.join(unknown)}; available: {', '.join(sorted(self.loras))}.",
                )
        if wanted == self._active_loras or not self.loras:
            return
        if wanted:
            self.txt2img.enable_lora()
            self.txt2img.set_adapters(
                [self.loras[name] for name in wanted], adapter_weights=list(wanted.values())
            )
        else:
            self.txt2img.disable_lora()
        self._active_loras = dict(wanted)


def _strength(value: float | None, default: float) -> float:
    strength = default if value is None else value
    if not 0.0 < strength <= 1.0:
        raise WorkerError(ErrorCode.BAD_INPUT, f"Strength must be above 0 and at most 1, got {strength}.")
    return strength


def _check_cancel(cancelled: Callable[[], bool] | None) -> None:
    if cancelled is not None and cancelled():
        raise WorkerError(ErrorCode.CANCELLED, "The job was cancelled.")
