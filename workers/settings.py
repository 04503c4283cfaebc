"""The workers' configuration: broker, model and API settings. No database, no Discord token."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


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
    progress_interval_s: float = Field(default=1.5, gt=0)


@lru_cache(maxsize=1)
def get_settings() -> WorkerSettings:
    """The process-wide settings, read once."""
    return WorkerSettings()
