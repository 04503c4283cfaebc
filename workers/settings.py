"""The workers' configuration: broker, model and API settings. No database, no Discord token."""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from workers.schema import ImageFormat

CompileScope = Literal["full", "blocks"]  # what TORCH_COMPILE compiles (workers.sdxl.loading)

log = logging.getLogger(__name__)

# Old setting names still read, each with its current name; a line at start says to rename it.
DEPRECATED_NAMES = {"progress_interval_s": "progress_report_interval_s"}


class WorkerSettings(BaseSettings):
    """Everything a worker process reads. Secrets are ``SecretStr`` so they never print."""

    # An empty variable (KEY= in .env) means "use the default", as an operator would expect.
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", env_ignore_empty=True
    )

    broker_url: str = "sqla+sqlite:///./data/broker.db"
    result_backend: str = "db+sqlite:///./data/results.db"

    sdxl_model: str = "stabilityai/stable-diffusion-xl-base-1.0"
    sdxl_refiner: str | None = None
    sdxl_vae: str | None = None  # e.g. madebyollin/sdxl-vae-fp16-fix
    upscaler_model: Path | None = None  # ESRGAN-class weights; Lanczos when unset
    embeddings_dir: Path | None = None  # textual inversions (*.safetensors, *.bin, *.pt)
    loras_dir: Path | None = None
    device: str = "auto"  # auto, cuda, cpu, mps
    dtype: str = "auto"  # auto, float16, bfloat16, float32
    torch_compile: bool = False
    compile_cache_dir: Path | None = None
    warmup: bool = True

    openai_api_key: SecretStr = SecretStr("")
    openai_base_url: str | None = None
    openai_timeout_s: float = Field(default=120.0, gt=0)
    openai_max_retries: int = Field(default=4, ge=0)
    openai_requests_per_minute: int = Field(default=50, ge=1)

    task_soft_time_limit_s: int = Field(default=1200, ge=1)
    task_time_limit_s: int = Field(default=1260, ge=1)
    visibility_timeout_s: int = Field(default=1800, ge=1)
    max_redeliveries: int = Field(default=3, ge=0)
    # The worker's minimum gap between two progress reports of one job. PROGRESS_INTERVAL_S, its
    # old name, is also the bot's (progress edits), so one variable used to set both.
    progress_report_interval_s: float = Field(
        default=1.5, gt=0, validation_alias=AliasChoices("progress_report_interval_s", "progress_interval_s")
    )

    # How result images are encoded: lossless either way (see bench/RESULTS.md for the numbers).
    image_format: ImageFormat = ImageFormat.WEBP
    # zlib level for PNG, libwebp's lossless preset (cwebp -z) for WebP; None: the measured default.
    image_compress_level: int | None = Field(default=None, ge=0, le=9)

    @model_validator(mode="before")
    @classmethod
    def _warn_deprecated(cls, data: object) -> object:
        # The sources have already mapped old names onto fields (under the new name), so look
        # where operators set them.
        environ = {key.lower() for key in os.environ}
        present = environ | ({str(key).lower() for key in data} if isinstance(data, dict) else set())
        for old, new in DEPRECATED_NAMES.items():
            # PROGRESS_INTERVAL_S is also the bot's own setting: next to the new name it is the
            # bot's, and only alone is it what this worker reads.
            if old in present and new not in environ:
                log.warning("setting %s is deprecated; use %s", old.upper(), new.upper())
        return data

    @property
    def progress_interval_s(self) -> float:
        """The old name of :attr:`progress_report_interval_s`, for code not yet renamed."""
        return self.progress_report_interval_s

    # SDXL speed levers (bench/bench_sdxl.py measures each one on and off).
    # VAE precision, cast once at load: auto takes fp16 for an fp16-fix VAE, bf16 on GPUs that
    # have it, else fp16 with an fp32 retry of any decode that overflows; float32 is the slow,
    # exact reference.
    vae_dtype: str = "auto"  # auto, float16, bfloat16, float32
    gpu_postprocess: bool = True  # pixels to uint8 on the device: one small copy to the host
    gpu_previews: bool = True  # previews projected on the device, copied without waiting
    preview_every_steps: int = Field(default=4, ge=1)  # latent previews at most this often
    compile_mode: str = "default"  # torch.compile mode: default, max-autotune-no-cudagraphs...
    compile_vae: bool = True  # with TORCH_COMPILE, compile the VAE decoder as well as the UNet
    # full: the whole UNet; blocks: only its transformer blocks (a much shorter cold compile).
    compile_scope: CompileScope = "full"
    # Aspect ratios whose bucket is compiled at start when TORCH_COMPILE is on; "all": every bucket.
    compile_warmup_aspects: str = "1:1,2:3,3:2,3:4,4:3,9:16,16:9"
    attention_backend: str = "measure"  # measure, auto, flash, efficient, cudnn, math (SDPA kernels)
    fp8: bool = False  # FP8 UNet linear layers through torchao (Hopper or newer)
    upscale_fewest_tiles: bool = True  # cover the upscale with the fewest (slightly larger) tiles
    channels_last: bool = False  # measured slower in eager fp16 on an H200; try it with compile

    # Image inputs: image prompts, --sref, --cref/--oref through an IP-Adapter, and /describe.
    # IP_ADAPTER_MODEL: hub id or local folder holding IP-Adapter weights (e.g. h94/IP-Adapter);
    # unset, image prompts fall back to img2img and --sref/--cref/--oref are noted as ignored.
    ip_adapter_model: str | None = None
    ip_adapter_subfolder: str = "sdxl_models"
    ip_adapter_weight_name: str = "ip-adapter_sdxl.safetensors"
    # The CLIP image encoder: unset, the "image_encoder" folder beside the weights; else a local
    # folder of its own, or a path inside the IP-Adapter repository (models/image_encoder).
    image_encoder_model: str | None = None
    # /describe: an image-to-text (captioning) model, hub id or local folder.
    describe_model: str = "Salesforce/blip-image-captioning-base"
    describe_max_tokens: int = Field(default=40, ge=4, le=200)
    # /describe on the OpenAI engine: a vision-capable chat model.
    openai_describe_model: str = "gpt-4o-mini"

    # Image safety classifier on SDXL results (workers/safety.py): a transformers image
    # classifier, folder or hub id; unset, results are not classified.
    safety_model: str | None = None
    # An image is flagged when its unsafe labels' probability reaches this.
    safety_threshold: float = Field(default=0.5, ge=0, le=1)
    # Comma-separated label names that count as unsafe, matched case-insensitively.
    safety_unsafe_labels: str = "nsfw,porn,hentai,explicit,unsafe"
    # Input pixels per tile side when UPSCALER_MODEL runs tiled (workers/upscaler.py).
    upscaler_tile_px: int = Field(default=512, ge=64)

    # Running it for real (issues 15 and 17).
    # A running task refreshes its PROGRESS meta (worker, heartbeat_at) this often, so the bot
    # can tell a dead worker from a slow one.
    heartbeat_interval_s: float = Field(default=10.0, gt=0)
    # Prometheus metrics of this worker on this port (0: off).
    worker_metrics_port: int = Field(default=0, ge=0, le=65535)
    # Where OPENAI_REQUESTS_PER_MINUTE is counted: a redis:// URL shares it between all API
    # workers; unset, the result backend when that is Redis, else each process counts its own.
    openai_rate_limit_storage: str | None = None
    # One JSON object per log line (as the bot's LOG_JSON).
    log_json: bool = False
    # A worker whose model failed to load tries again after this many seconds.
    model_retry_s: float = Field(default=60.0, gt=0)


@lru_cache(maxsize=1)
def get_settings() -> WorkerSettings:
    """The process-wide settings, read once."""
    return WorkerSettings()
