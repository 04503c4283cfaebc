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
  new area, then the original pasted back with a feathered seam. ZOOM takes any factor from 1
  to 2 and a new ``--ar`` (Custom Zoom, :mod:`workers.sdxl.outpaint`).
- BLEND, REGION and reference pictures (image prompts, ``--sref``, ``--cref``, ``--oref``
  through the IP-Adapter of ``IP_ADAPTER_MODEL``, loaded once here): :mod:`workers.sdxl.operations`.

The prompt reaches the pipelines as embeddings (:mod:`workers.sdxl.conditioning`): multi-prompt
weights, negative parts and ``(word:1.3)`` emphasis; ``--weird`` offsets each image's embedding
by its seed. ``--stop N`` ends each pipeline call after N % of its own steps (at least one) and
decodes the unfinished latents.

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

Where SDXL only approximates Midjourney (``--weird``, ``--stop``, image inputs without an
IP-Adapter, blends) the result carries a short note.

``run`` returns an :class:`~workers.output.EngineOutput`: PIL images, never encoded here (the task
layer encodes once), with per-phase timings. Every pipeline call stops at latents; the engine
encodes the prompt itself (``text_encode``), decodes with its fixed-precision VAE
(``vae_decode``, :mod:`workers.sdxl.vae`) and turns pixels into uint8 on the device
(``postprocess``). The speed levers are worker settings (see ``WorkerSettings``) and
:attr:`SDXLEngine.levers`, which the benchmark switches at run time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

from workers.image_prompts import IPAdapter, load_ip_adapter
from workers.imaging import encode_png
from workers.output import EngineOutput
from workers.schema import (
    GRID_SIZE,
    MAX_SEED,
    SDXL_BUCKETS,
    Engine,
    EngineReport,
    ErrorCode,
    GenerationParams,
    JobKind,
    JobRequest,
    Progress,
    ReferenceRole,
    WorkerError,
    b64encode_bytes,
    nearest_bucket,
)
from workers.sdxl import health, loading
from workers.sdxl.core import text_params
from workers.sdxl.deepcache import draft_steps
from workers.sdxl.jobs import (
    Job,
    Levers,
    QuietFp32CastWarning,
    check_cancel,
)
from workers.sdxl.operations import Operations
from workers.sdxl.outpaint import Outpainting
from workers.sdxl.progress import ProgressReporter
from workers.sdxl.upscale import Upscaling
from workers.sdxl.vae import VaeRunner
from workers.settings import WorkerSettings
from workers.upscaler import LanczosUpscaler, Upscaler, configured_upscaler

log = logging.getLogger(__name__)


class SDXLEngine(Operations, Outpainting, Upscaling):
    """A loaded SDXL model with its txt2img, img2img and inpaint pipelines sharing weights.

    The operations live in :class:`~workers.sdxl.operations.Operations` (imagine, vary, blend,
    region), :class:`~workers.sdxl.outpaint.Outpainting` (zoom, pan, square) and
    :class:`~workers.sdxl.upscale.Upscaling`; the plumbing they share in
    :class:`~workers.sdxl.core.EngineCore`.
    """

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
        self.attention_times_ms: dict[str, float] = {}  # what ATTENTION_BACKEND=measure timed
        # What enlarges an upscale's source before its img2img pass (load() sets UPSCALER_MODEL's).
        self.upscaler: Upscaler = LanczosUpscaler()
        self.ip_adapter: IPAdapter | None = None  # load() sets IP_ADAPTER_MODEL's
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
        if not any(isinstance(f, QuietFp32CastWarning) for f in quiet.filters):
            quiet.addFilter(QuietFp32CastWarning())
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
        # After any QKV fusion (the adapter saves the processors it restores when switched off),
        # before FP8 and compile. Loaded once; img2img and inpaint share it through from_pipe.
        ip_adapter = load_ip_adapter(pipe, settings) if settings.ip_adapter_model else None
        if settings.fp8 and not fp8_skipped:
            # After the layout changes: FP8 replaces the linear weights with tensor subclasses.
            fp8_skipped = loading.quantize_fp8(pipe.unet)
        if fp8_skipped:
            log.warning("%s", fp8_skipped)
        if settings.torch_compile:
            loading.enable_compile(
                pipe,
                settings.compile_cache_dir,
                mode=settings.compile_mode,
                vae=settings.compile_vae,
                scope=settings.compile_scope,
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
        if ip_adapter is not None:
            ip_adapter.share_with(engine.img2img, engine.inpaint)
            ip_adapter.fold = settings.torch_compile  # no recompile per --iw value
            engine.ip_adapter = ip_adapter
        if settings.fp8:
            engine.fp8_status = fp8_skipped or "applied"
        if settings.attention_backend.strip().lower() == "measure":
            choice, engine.attention_times_ms = loading.measure_attention(
                pipe.unet, device, dtype, engine.base_resolution // 8
            )
            engine.levers.attention_backend = choice
            log.info("attention kernel %s (ms per UNet evaluation: %s)", choice, engine.attention_times_ms)
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
        ``COMPILE_WARMUP_ASPECTS``, one 2x upscale of a base-size image (its larger tiles and
        the tiled decode are shapes of their own) and, with an IP-Adapter loaded, one image
        prompt grid (its attention processors are a graph of their own), so no member's first
        job waits for a compile.
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
            if self.ip_adapter is not None:
                self.run(
                    JobRequest(
                        job_id="warm-up",
                        kind=JobKind.IMAGINE,
                        params=params,
                        seed=0,
                        count=GRID_SIZE,
                        references={ReferenceRole.PROMPT.value: [source]},
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
        handlers: dict[JobKind, Callable[[Job], list[Image.Image]]] = {
            JobKind.IMAGINE: self._imagine,
            JobKind.REROLL: self._imagine,
            JobKind.VARIATION: self._variation,
            JobKind.UPSCALE: self._upscale,
            JobKind.ZOOM: self._zoom,
            JobKind.PAN: self._pan,
            JobKind.SQUARE: self._square,
            JobKind.BLEND: self._blend,
            JobKind.REGION: self._region,
        }
        handler = handlers.get(request.kind)
        if handler is None:
            raise WorkerError(ErrorCode.BAD_INPUT, f"The SDXL engine does not run {request.kind} jobs.")
        check_cancel(cancelled)
        params = request.params
        encoded, loras = text_params(params)
        self._apply_loras(loras)
        upscale = request.kind is JobKind.UPSCALE
        if upscale:  # per-tile --weird offsets would give each tile of one picture another prompt
            encoded = encoded.model_copy(update={"weird": 0})
        draft = params.draft and not upscale
        steps = draft_steps(params.step_count) if draft else params.step_count
        job = Job(
            request=request,
            prompt=encoded.model_prompt,
            negative=encoded.model_negative.strip() or None,
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
            stop=1.0 if upscale else params.stop / 100,
            text_params=encoded,
        )
        job.notes.extend(approximation_notes(params, upscale=upscale))
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


def approximation_notes(params: GenerationParams, *, upscale: bool = False) -> list[str]:
    """Member-facing notes for prompt parameters SDXL carries out only approximately."""
    notes = []
    if params.stop < 100:
        if upscale:
            notes.append("--stop does not apply to upscales: upscaled to the end.")
        else:
            notes.append(
                f"--stop {params.stop}: the image was left unfinished at {params.stop} % of the steps."
            )
    if params.weird and not upscale:
        notes.append("--weird on SDXL: each image's prompt is nudged at random, in proportion to the value.")
    return notes
