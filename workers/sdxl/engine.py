"""The SDXL engine: one warm set of weights per worker process serving every Mirage operation.

``SDXLEngine.load(settings)`` builds it once (the Celery task calls it in the worker child);
``engine.run(request, progress, cancelled)`` does one job. txt2img, img2img and inpainting are
three diffusers pipelines over the *same* modules (``from_pipe``), so they cost one model's memory.

Operations (``request.kind``):

- IMAGINE / REROLL: one batch of ``request.count`` (4) images, seeds ``seed..seed+3``, at the
  aspect bucket scaled to the model's base resolution.
- VARIATION: img2img of the input at ``strength`` (0.5 subtle, 0.85 strong, default 0.85).
- UPSCALE: 2x with ``UPSCALER_MODEL`` (:mod:`workers.upscaler`; Lanczos when unset), then
  img2img over the fewest overlapping tiles (up to 1.25x the base side, 4 for a 2x of 1024 px,
  denoised as one batch) at ``strength``
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

``--draft`` halves the steps (at least 8) and reuses the UNet's deep features on every other
step (:mod:`workers.sdxl.deepcache`): a rough grid at a fraction of the cost.

``run`` returns an :class:`~workers.output.EngineOutput`: PIL images, never encoded here (the task
layer encodes once), with per-phase timings. Every pipeline call stops at latents; the engine
encodes the prompt itself (``text_encode``), decodes with its fixed-precision VAE
(``vae_decode``, :mod:`workers.sdxl.vae`) and turns pixels into uint8 on the device
(``postprocess``). The speed levers are worker settings (see ``WorkerSettings``) and
:attr:`SDXLEngine.levers`, which the benchmark switches at run time.
"""

from __future__ import annotations

import contextlib
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
from workers.output import EngineOutput
from workers.schema import (
    GRID_SIZE,
    MAX_SEED,
    SDXL_BUCKETS,
    Direction,
    Engine,
    EngineReport,
    ErrorCode,
    GenerationParams,
    JobKind,
    JobRequest,
    Progress,
    Sampler,
    WorkerError,
    b64decode_text,
    b64encode_bytes,
    nearest_bucket,
    scale_bucket,
)
from workers.sdxl import health, loading
from workers.sdxl.deepcache import deep_cache, draft_steps
from workers.sdxl.progress import ProgressReporter
from workers.sdxl.prompt import parse_lora_tags
from workers.sdxl.tiles import fewest_tiles, ramp, tile_grid
from workers.sdxl.vae import VaeRunner, to_images
from workers.settings import WorkerSettings
from workers.upscaler import LanczosUpscaler, Upscaler, configured_upscaler

log = logging.getLogger(__name__)

REFINER_SWITCH = 0.8  # the base model denoises the first 80 % of the schedule, the refiner the rest
VARY_STRENGTH = 0.85
UPSCALE_STRENGTH = 0.35
UPSCALE_FACTOR = 2.0
MAX_UPSCALE = 4.0
ZOOM_SCALE = 2.0
TILE_BATCH = 4  # upscale tiles per pipeline call: the same memory as a grid
MAX_TILE_FACTOR = 1.25  # upscale tiles may be this much larger than the base side (1280 px for SDXL)
PHASES = ("text_encode", "denoise", "vae_decode", "postprocess")
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
class Levers:
    """The speed levers read per job; the benchmark flips them on a loaded engine.

    Load-time levers (VAE precision, compile, FP8) live in the settings; the VAE's precision can
    also be changed later with :meth:`SDXLEngine.set_vae_dtype`, which casts once.
    """

    gpu_postprocess: bool = True
    gpu_previews: bool = True
    preview_every_steps: int = 4
    attention_backend: str = "auto"
    upscale_fewest_tiles: bool = True

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> Levers:
        """The levers as the worker's settings configure them."""
        return cls(
            gpu_postprocess=settings.gpu_postprocess,
            gpu_previews=settings.gpu_previews,
            preview_every_steps=settings.preview_every_steps,
            attention_backend=settings.attention_backend,
            upscale_fewest_tiles=settings.upscale_fewest_tiles,
        )


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
    draft: bool = False
    phases: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
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
        # Its dtype must be named: from_pipe casts the shared modules to float32 by default,
        # which on an H200 made every grid 2.6x slower than plain diffusers (bench/RESULTS.md).
        same_dtype = {loading.dtype_kwarg(): dtype}
        self.img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(txt2img, **same_dtype)
        self.inpaint = StableDiffusionXLInpaintPipeline.from_pipe(txt2img, **same_dtype)
        self.refiner = refiner
        self.embedding_tokens = embedding_tokens or []
        self.loras = loras or {}
        self.lora_unavailable = lora_unavailable
        self.load_s = load_s
        self.progress_interval_s = settings.progress_report_interval_s
        self.clock: Callable[[], float] = time.monotonic  # injectable for tests
        self._scheduler_config = txt2img.scheduler.config
        self._refiner_scheduler_config = refiner.scheduler.config if refiner is not None else None
        self._active_loras: dict[str, float] = {}
        self.levers = Levers.from_settings(settings)
        self.vae = VaeRunner(txt2img.vae, device=device, model_dtype=dtype, mode=settings.vae_dtype)
        self.last_info: dict[str, Any] = {}  # the facts of the last job, for logs and tests
        self.fp8_status = "off"  # "applied", or why FP8 was skipped
        # What enlarges an upscale's source before its img2img pass (load() sets UPSCALER_MODEL's).
        self.upscaler: Upscaler = LanczosUpscaler()
        for pipe in self._pipelines():
            pipe.set_progress_bar_config(disable=True)

    # ----------------------------------------------------------------------------- loading

    @classmethod
    def load(cls, settings: WorkerSettings) -> SDXLEngine:
        """Load the model named by ``settings.sdxl_model`` (hub id or local folder) and warm it up.

        Raises ``WorkerError(ENGINE_UNAVAILABLE)`` with a one-line reason when it cannot load.
        The outcome is recorded for health checks (:mod:`workers.sdxl.health`).
        """
        health.record(health.LOADING, model=settings.sdxl_model)
        try:
            engine = cls._load(settings)
        except WorkerError as exc:
            health.record(health.FAILED, model=settings.sdxl_model, reason=exc.message)
            raise
        except BaseException as exc:
            health.record(
                health.FAILED, model=settings.sdxl_model, reason=f"{type(exc).__name__}: {exc}"[:300]
            )
            raise
        health.record(
            health.LOADED,
            model=settings.sdxl_model,
            device=str(engine.device),
            load_s=round(engine.load_s, 1),
        )
        return engine

    @classmethod
    def _load(cls, settings: WorkerSettings) -> SDXLEngine:
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
        fp8_skipped = loading.fp8_unavailable() if settings.fp8 else None
        if gpu:
            # SDPA is diffusers' default attention processor on torch 2 (ATTENTION_BACKEND picks
            # its kernel). Fused QKV would bypass LoRA adapters and FP8's per-layer quantization.
            loading.speed_up_for_gpu(
                pipe,
                fuse_qkv=not loras and not (settings.fp8 and not fp8_skipped),
                channels_last=settings.channels_last,
            )
            if refiner is not None and settings.channels_last:
                refiner.unet.to(memory_format=torch.channels_last)
        if settings.fp8 and not fp8_skipped:
            # After the layout changes: FP8 replaces the linear weights with tensor subclasses.
            fp8_skipped = loading.quantize_fp8(pipe.unet)
        if fp8_skipped:
            log.warning("%s", fp8_skipped)
        if settings.torch_compile:
            loading.enable_compile(
                pipe, settings.compile_cache_dir, mode=settings.compile_mode, vae=settings.compile_vae
            )
            if refiner is not None:
                refiner.unet.compile(fullgraph=False, dynamic=False)
        upscaler = configured_upscaler(settings, device=device, dtype=dtype)
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
        engine.upscaler = upscaler
        if settings.fp8:
            engine.fp8_status = fp8_skipped or "applied"
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
        """Short grids through the real job path: allocator, kernel choices and compiles happen now.

        One grid at the base size; with ``TORCH_COMPILE`` one per bucket of
        ``COMPILE_WARMUP_ASPECTS`` and one 2x upscale of a base-size image (its larger tiles and
        the tiled decode are shapes of their own), so no member's first job waits for a compile.
        """
        params = GenerationParams(prompt="warm-up", steps=2)
        for width, height in self.warmup_buckets():
            sized = params.model_copy(update={"width": width, "height": height})
            self.run(
                JobRequest(job_id="warm-up", kind=JobKind.IMAGINE, params=sized, seed=0, count=GRID_SIZE)
            )
        if self.settings.torch_compile:
            side = self.base_resolution
            source = b64encode_bytes(encode_png(Image.new("RGB", (side, side), (128, 128, 128))))
            self.run(
                JobRequest(
                    job_id="warm-up", kind=JobKind.UPSCALE, params=params, seed=0, count=1, input_image=source
                )
            )

    def warmup_buckets(self) -> list[tuple[int, int]]:
        """The 1024-base buckets :meth:`warm_up` runs (the square one first)."""
        if not self.settings.torch_compile:
            return [(1024, 1024)]
        text = self.settings.compile_warmup_aspects.strip().lower()
        if text == "all":
            return sorted(SDXL_BUCKETS, key=lambda wh: wh != (1024, 1024))
        buckets: list[tuple[int, int]] = []
        for item in text.split(","):
            if not item.strip():
                continue
            try:
                ratio_w, ratio_h = (int(side) for side in item.split(":"))
            except ValueError:
                log.warning("COMPILE_WARMUP_ASPECTS: %r is not an aspect ratio like 16:9; skipped", item)
                continue
            bucket = nearest_bucket(ratio_w, ratio_h)
            if bucket not in buckets:
                buckets.append(bucket)
        return buckets or [(1024, 1024)]

    def set_vae_dtype(self, mode: str) -> torch.dtype:
        """Cast the VAE once to ``mode``'s precision (auto, float16, bfloat16, float32)."""
        return self.vae.set_dtype(mode)

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
    ) -> EngineOutput:
        """Do one job and return its images (not encoded), seed, report, phase timings and notes.

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
        draft = params.draft and request.kind is not JobKind.UPSCALE
        steps = draft_steps(params.step_count) if draft else params.step_count
        job = _Job(
            request=request,
            prompt=prompt,
            negative=params.negative_prompt.strip() or None,
            steps=steps,
            guidance=params.guidance_scale,
            reporter=ProgressReporter(
                request.job_id,
                progress,
                interval_s=self.progress_interval_s,
                total_steps=steps,
                clock=self.clock,
                preview_every=self.levers.preview_every_steps,
                gpu_previews=self.levers.gpu_previews,
            ),
            cancelled=cancelled,
            draft=draft,
        )
        if draft:
            job.notes.append(
                f"Draft: {steps} steps, deep features reused every other step; "
                "rerun without --draft for full detail."
            )
        elif params.draft:
            job.notes.append("--draft does not apply to upscales: upscaled at full quality.")
        with loading.attention_backend(self.levers.attention_backend, self.device):
            images = handler(job)
        job.reporter.finish()
        seeds = [(request.seed + index) % (MAX_SEED + 1) for index in range(len(images))]
        self.last_info = {
            "kind": str(request.kind),
            "steps": job.steps,
            "sampler": str(params.sampler),
            "guidance": job.guidance,
            "size": [images[0].width, images[0].height],
            "seeds": seeds,
            "refiner": self.settings.sdxl_refiner if self.refiner is not None else None,
            "vae_dtype": str(self.vae.dtype).removeprefix("torch."),
            "loras": loras,
            **job.info,
            "phases": {name: round(value, 4) for name, value in job.phases.items()},
            "total_s": round(time.perf_counter() - started, 3),
        }
        log.info("sdxl job %s: %s", request.job_id, self.last_info)
        return EngineOutput(
            images=images,
            seed=request.seed,
            report=EngineReport(
                engine=Engine.SDXL,
                model=self.settings.sdxl_model,
                device=str(self.device),
                dtype=str(self.dtype).removeprefix("torch."),
                sampler=str(params.sampler),
                steps=job.steps,
            ),
            phases=dict(job.phases),
            notes=list(job.notes),
        )

    @contextmanager
    def _phase(self, job: _Job, name: str) -> Iterator[None]:
        """Time a phase; on a GPU it waits for the phase's kernels so the time is the phase's own."""
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            job.phases[name] = job.phases.get(name, 0.0) + time.perf_counter() - started

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
            **self._encode_prompt(job, count),
        }
        if params.chaos > 0:
            kwargs.update(self._chaos_inputs(job, count, width, height, generators, kwargs))
            job.info["chaos"] = params.chaos
        with circular_padding([self.txt2img.unet, self.txt2img.vae], params.tile):
            return self._decode(job, self._denoise(self.txt2img, job, kwargs, count=count))

    def _variation(self, job: _Job) -> list[Image.Image]:
        count = max(1, job.request.count)
        source = self._fit_bucket(self._input_image(job))
        strength = _strength(job.request.strength, VARY_STRENGTH)
        job.info["strength"] = strength
        kwargs: dict[str, Any] = {
            "image": source,
            "strength": strength,
            "num_inference_steps": _steps_for_strength(job.steps, strength),
            "guidance_scale": job.guidance,
            "generator": self._generators(job.request.seed, count),
            **self._encode_prompt(job, count),
        }
        job.reporter.set_phases([1.0], total_steps=max(1, int(kwargs["num_inference_steps"] * strength)))
        with circular_padding([self.img2img.unet, self.img2img.vae], job.request.params.tile):
            return self._decode(job, self._denoise(self.img2img, job, kwargs, count=count))

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
        with self._phase(job, "upscaler"):
            enlarged = self.upscaler.upscale_to(source, target)
        if self.upscaler.note:
            job.notes.append(self.upscaler.note)
        job.info["upscaler"] = self.upscaler.name
        strength = _strength(job.request.strength, UPSCALE_STRENGTH)
        steps = _steps_for_strength(job.steps, strength)
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
        _check_cancel(job.cancelled)
        # The whole upscaled latent is decoded at once; VAE tiling keeps that within memory.
        pipe.vae.enable_tiling()
        try:
            return self._decode(job, blended)
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

    # ---------------------------------------------------------------------------- helpers

    def _encode_prompt(self, job: _Job, count: int) -> dict[str, torch.Tensor]:
        """The prompt's embeddings for ``count`` images (timed as ``text_encode``).

        Encoding here rather than inside the pipeline is what makes the text encoders' time
        visible; the embeddings are exactly the ones the pipeline would compute.
        """
        # no_grad, not inference_mode: inference tensors fed to a compiled UNet break AOTAutograd.
        with self._phase(job, "text_encode"), torch.no_grad():
            embeds, negative, pooled, negative_pooled = self.txt2img.encode_prompt(
                prompt=job.prompt,
                device=self.device,
                num_images_per_prompt=count,
                do_classifier_free_guidance=job.guidance > 1.0,
                negative_prompt=job.negative,
            )
        out = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if negative is not None:
            out.update(negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled)
        return out

    def _denoise(
        self, pipe: Any, job: _Job, kwargs: dict[str, Any], *, count: int, refine: bool = True
    ) -> torch.Tensor:
        """Run ``pipe`` (and the refiner for the last 20 % of the schedule, when there is one) to latents."""
        if self.refiner is None or not refine:
            return self._call(pipe, job, kwargs)
        job.reporter.set_phases([REFINER_SWITCH, 1 - REFINER_SWITCH])
        latents = self._call(pipe, job, {**kwargs, "denoising_end": REFINER_SWITCH})
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
        return refined

    def _call(self, pipe: Any, job: _Job, kwargs: dict[str, Any], *, refiner: bool = False) -> torch.Tensor:
        """One pipeline call to latents, with a fresh scheduler, progress and cancellation wired in."""
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

        draft = job.draft and not refiner
        with self._phase(job, "denoise"), contextlib.ExitStack() as stack:
            cache = stack.enter_context(deep_cache(pipe)) if draft else None
            output = pipe(
                **kwargs,
                output_type="latent",
                callback_on_step_end=on_step_end,
                callback_on_step_end_tensor_inputs=["latents"],
            )
        if cache is not None:
            job.info["unet_full"] = job.info.get("unet_full", 0) + cache.full_evaluations
            job.info["unet_shallow"] = job.info.get("unet_shallow", 0) + cache.shallow_evaluations
        reporter.end_phase(steps_seen)
        _check_cancel(job.cancelled)
        return output.images

    def _decode(self, job: _Job, latents: torch.Tensor) -> list[Image.Image]:
        """Latents (as the pipelines return them) to images: ``vae_decode`` then ``postprocess``."""
        with self._phase(job, "vae_decode"):
            pixels = self.vae.decode(latents)
        with self._phase(job, "postprocess"):
            return to_images(
                pixels, on_device=self.levers.gpu_postprocess, image_processor=self.txt2img.image_processor
            )

    def _chaos_inputs(
        self,
        job: _Job,
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
        sigma = CHAOS_EMBED * amount * prompt_embeds.float().std()
        return {
            "latents": latents.to(self.device, self.dtype),
            "prompt_embeds": prompt_embeds + (sigma * torch.stack(jitter)).to(prompt_embeds.dtype),
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
