"""The SDXL engine's small parts: per-job state, schedulers, levers and checks.

Kept apart from the engine so that its operation modules (:mod:`workers.sdxl.operations`,
:mod:`workers.sdxl.outpaint`) and the engine itself share them without importing each other.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)

from workers.schema import ErrorCode, GenerationParams, JobRequest, Sampler, WorkerError
from workers.sdxl.progress import ProgressReporter
from workers.settings import WorkerSettings

REFINER_SWITCH = 0.8  # the base model denoises the first 80 % of the schedule, the refiner the rest
PHASES = ("text_encode", "denoise", "vae_decode", "postprocess")


class QuietFp32CastWarning(logging.Filter):
    """Drop diffusers' "modules that should be kept in float32: []" warning.

    Diffusers logs it on every ``.to(dtype)`` even when the list is empty, and its own img2img
    and inpaint pipelines cast the VAE on every call, so a worker's log would fill with it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


def scheduler_for(sampler: Sampler, config: Any) -> Any:
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


def steps_for_strength(steps: int, strength: float) -> int:
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
    attention_backend: str = "measure"
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
class Job:
    """What one ``run`` works with, resolved from the request.

    ``prompt`` / ``negative`` are the plain texts (LoRA tags removed) for the refiner, which
    takes strings; the base pipelines get embeddings from ``params`` (weights, emphasis).
    ``stop`` is ``--stop`` as a fraction of the steps (1.0: finish).
    """

    request: JobRequest
    prompt: str
    negative: str | None
    steps: int
    guidance: float
    reporter: ProgressReporter
    cancelled: Callable[[], bool] | None
    draft: bool = False
    stop: float = 1.0
    text_params: GenerationParams | None = None  # the parameters with LoRA tags taken out
    phases: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    info: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def check_strength(value: float | None, default: float) -> float:
    """``value`` (or ``default``) as a denoising strength, or ``BAD_INPUT`` outside (0, 1]."""
    strength = default if value is None else value
    if not 0.0 < strength <= 1.0:
        raise WorkerError(ErrorCode.BAD_INPUT, f"Strength must be above 0 and at most 1, got {strength}.")
    return strength


def check_cancel(cancelled: Callable[[], bool] | None) -> None:
    """Raise ``WorkerError(CANCELLED)`` when the job has been cancelled."""
    if cancelled is not None and cancelled():
        raise WorkerError(ErrorCode.CANCELLED, "The job was cancelled.")
