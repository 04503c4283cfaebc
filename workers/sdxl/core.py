"""What every SDXL operation shares: prompt conditioning, the pipeline call, decoding, inputs.

:class:`EngineCore` is the base of :class:`~workers.sdxl.engine.SDXLEngine`; the operation
mixins (:mod:`workers.sdxl.operations`, :mod:`workers.sdxl.outpaint`) build on it. Attributes are
set by ``SDXLEngine.__init__``.

Prompts reach the pipelines as embeddings from :func:`workers.sdxl.conditioning.encode_params`:
weighted multi-prompt parts, negative-weight parts and ``(word:1.3)`` emphasis, identical to
diffusers' own encoding for a plain prompt; ``--weird`` adds per-image offsets
(:func:`~workers.sdxl.conditioning.apply_weird`) seeded by each image's seed.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from PIL import Image

from workers.image_input import decode_image
from workers.image_prompts import IPAdapter
from workers.schema import (
    MAX_SEED,
    ErrorCode,
    GenerationParams,
    PromptPart,
    ReferenceRole,
    WorkerError,
    nearest_bucket,
    scale_bucket,
)
from workers.sdxl.conditioning import apply_weird, encode_params
from workers.sdxl.deepcache import deep_cache
from workers.sdxl.jobs import REFINER_SWITCH, Job, Levers, check_cancel, scheduler_for
from workers.sdxl.prompt import parse_lora_tags
from workers.sdxl.vae import VaeRunner, to_images
from workers.settings import WorkerSettings

# How a member knows each kind of reference, for error messages ("--cref image 2 is not ...").
_ROLE_LABELS = {
    ReferenceRole.PROMPT.value: "image prompt",
    ReferenceRole.STYLE.value: "--sref image",
    ReferenceRole.CHARACTER.value: "--cref image",
    ReferenceRole.OMNI.value: "--oref image",
}


def text_params(params: GenerationParams) -> tuple[GenerationParams, dict[str, float]]:
    """``params`` with LoRA tags taken out of the prompt and its parts, and the tags' LoRAs.

    A part that held a tag loses its emphasis pieces (they spelled the text with the tag).
    """
    prompt, loras = parse_lora_tags(params.prompt)
    parts = []
    for part in params.parts:
        text, found = parse_lora_tags(part.text)
        loras.update(found)
        parts.append(part if text == part.text else PromptPart(text=text, weight=part.weight))
    return params.model_copy(update={"prompt": prompt, "parts": tuple(parts)}), loras


class EngineCore:
    """The loaded pipelines and the plumbing every operation uses."""

    settings: WorkerSettings
    device: torch.device
    dtype: torch.dtype
    txt2img: Any
    img2img: Any
    inpaint: Any
    refiner: Any
    vae: VaeRunner
    levers: Levers
    ip_adapter: IPAdapter | None
    _scheduler_config: Any
    _refiner_scheduler_config: Any

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

    @contextmanager
    def _phase(self, job: Job, name: str) -> Iterator[None]:
        """Time a phase; on a GPU it waits for the phase's kernels so the time is the phase's own."""
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            job.phases[name] = job.phases.get(name, 0.0) + time.perf_counter() - started

    # ---------------------------------------------------------------------------- helpers

    def _encode_prompt(self, job: Job, count: int, seed: int | None = None) -> dict[str, torch.Tensor]:
        """The prompt's embeddings for ``count`` images (timed as ``text_encode``).

        Encoding here rather than inside the pipeline is what makes the text encoders' time
        visible, and what lets weights, emphasis and ``--weird`` shape the embeddings. Image
        ``i`` gets ``--weird``'s offset for seed ``seed + i`` (``seed``: the job's).
        """
        params = job.text_params or job.request.params
        first = job.request.seed if seed is None else seed
        seeds = [(first + index) % (MAX_SEED + 1) for index in range(count)]
        # no_grad, not inference_mode: inference tensors fed to a compiled UNet break AOTAutograd.
        with self._phase(job, "text_encode"), torch.no_grad():
            conditioning = encode_params(self.txt2img, params, device=self.device)
            conditioning = apply_weird(conditioning, params.weird, seeds)
        out = conditioning.as_kwargs()
        if job.guidance <= 1.0:  # no classifier-free guidance: the negative side is never used
            del out["negative_prompt_embeds"], out["negative_pooled_prompt_embeds"]
        return out

    def _denoise(
        self, pipe: Any, job: Job, kwargs: dict[str, Any], *, count: int, refine: bool = True
    ) -> torch.Tensor:
        """Run ``pipe`` (and the refiner for the last 20 % of the schedule, when there is one) to latents.

        With ``--stop`` the pipeline stops after that share of its own steps (at least one) and
        the unfinished latents are returned as they are; the refiner, which would finish them,
        is skipped.
        """
        if job.stop < 1.0:
            job.info["stop"] = job.stop
            return self._call(pipe, job, kwargs, stop=job.stop)
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

    def _call(
        self, pipe: Any, job: Job, kwargs: dict[str, Any], *, refiner: bool = False, stop: float = 1.0
    ) -> torch.Tensor:
        """One pipeline call to latents, with a fresh scheduler, progress and cancellation wired in.

        ``stop`` below 1 ends the call after that share of its steps (``--stop``).
        """
        config = self._refiner_scheduler_config if refiner else self._scheduler_config
        pipe.scheduler = scheduler_for(job.request.params.sampler, config)
        reporter = job.reporter
        steps_seen = 0

        def on_step_end(pipeline: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            nonlocal steps_seen
            if job.cancelled is not None and job.cancelled():
                pipeline._interrupt = True  # diffusers' own stop flag, should the raise be caught
                raise WorkerError(ErrorCode.CANCELLED, "The job was cancelled.")
            steps_seen = index + 1
            reporter.step(index, pipeline.num_timesteps, tensors.get("latents"))
            # --stop counts the steps this call runs. denoising_end cuts the noise schedule
            # instead: an img2img call starts part-way down it, so a Vary (Subtle) at --stop 60
            # ran no step at all, and a few leading-spaced steps could all fall past the cut.
            if stop < 1.0 and steps_seen >= max(1, round(pipeline.num_timesteps * stop)):
                pipeline._interrupt = True  # diffusers skips the remaining steps, latents as they are
            return {}

        if self.ip_adapter is not None and self.ip_adapter.is_active and not refiner:
            self.ip_adapter.fold_scales()  # whatever set this call's scales (a no-op unless compiled)
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
        check_cancel(job.cancelled)
        return output.images

    def _decode(self, job: Job, latents: torch.Tensor) -> list[Image.Image]:
        """Latents (as the pipelines return them) to images: ``vae_decode`` then ``postprocess``."""
        with self._phase(job, "vae_decode"):
            pixels = self.vae.decode(latents)
        with self._phase(job, "postprocess"):
            return to_images(
                pixels, on_device=self.levers.gpu_postprocess, image_processor=self.txt2img.image_processor
            )

    def _generators(self, seed: int, count: int) -> list[torch.Generator]:
        """One CPU generator per image (seed, seed+1, ...): identical noise on any device."""
        return [torch.Generator("cpu").manual_seed((seed + index) % (MAX_SEED + 1)) for index in range(count)]

    def _input_image(self, job: Job) -> Image.Image:
        """The job's ``input_image``, decoded; ``BAD_INPUT`` when missing or unreadable."""
        data = job.request.input_image
        if not data:
            raise WorkerError(ErrorCode.BAD_INPUT, f"A {job.request.kind} job needs an input image.")
        return decode_image(data, "the input image")

    def _references(self, job: Job, role: str) -> list[Image.Image]:
        """The job's reference pictures of one role, decoded (``BAD_INPUT`` names a bad one)."""
        label = _ROLE_LABELS.get(str(role), f"{role} image")
        return [
            decode_image(data, f"{label} {index}")
            for index, data in enumerate(job.request.reference_images(role), start=1)
        ]

    def _fit_bucket(self, image: Image.Image) -> Image.Image:
        """``image`` at the model's bucket for its aspect (unchanged when it already is one)."""
        size = scale_bucket(*nearest_bucket(image.width, image.height), self.base_resolution)
        return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)
