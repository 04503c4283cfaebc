"""The bot's configuration: one pydantic-settings class, read from the environment and ``.env``."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from workers.logformat import URL_PASSWORD
from workers.schema import Engine, Visibility

log = logging.getLogger(__name__)

# Old setting names still read, each with its current name; a line at start says to rename it.
DEPRECATED_NAMES = {
    "cost_dalle_grid": "cost_openai_grid",
    # On the bot this is the gap between Discord progress edits; the workers' PROGRESS_INTERVAL_S
    # is how often they report, a different thing under the same name.
    "progress_interval_s": "progress_edit_interval_s",
}

ID_LIST_FORMAT = "comma-separated numeric ids, e.g. 123456789012345678,234567890123456789, or a JSON list"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# URLs that may carry a password (user:password@host); SQLAlchemy and Celery take them as strings.
URL_FIELDS = ("database_url", "broker_url", "result_backend")
MASK = "**********"  # what SecretStr prints


class Period(StrEnum):
    """How often a member's credit allowance resets."""

    DAY = "day"
    WEEK = "week"
    MONTH = "month"


def _data_dir() -> Path:
    return Path("data")


class BotSettings(BaseSettings):
    """Everything the bot process reads. Secrets are ``SecretStr`` so they never print."""

    # An empty variable (KEY= in .env) means "use the default", as an operator would expect.
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", env_ignore_empty=True
    )

    discord_token: SecretStr = SecretStr("")
    discord_guild_ids: Annotated[list[int], NoDecode] = Field(default_factory=list)
    database_url: str = "sqlite+aiosqlite:///./data/mirage.db"
    broker_url: str = "sqla+sqlite:///./data/broker.db"
    result_backend: str = "db+sqlite:///./data/results.db"
    media_dir: Path = Field(default_factory=lambda: _data_dir() / "media")
    media_backend: Literal["local", "s3"] = "local"
    s3_bucket: str = ""
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_access_key: SecretStr = SecretStr("")
    s3_secret_key: SecretStr = SecretStr("")
    s3_prefix: str = ""
    admin_user_ids: Annotated[list[int], NoDecode] = Field(default_factory=list)

    default_engine: Engine = Engine.SDXL
    default_visibility: Visibility = Visibility.PUBLIC
    openai_model: str = "dall-e-3"

    credit_limit: int = Field(default=25, ge=0)
    credit_period: Period = Period.DAY
    cost_sdxl_grid: int = Field(default=1, ge=0)
    cost_openai_grid: int = Field(
        default=2, ge=0, validation_alias=AliasChoices("cost_openai_grid", "cost_dalle_grid")
    )
    cost_upscale: int = Field(default=1, ge=0)
    cost_crop: int = Field(default=0, ge=0)

    max_running_per_member: int = Field(default=3, ge=1)
    max_waiting_per_member: int = Field(default=10, ge=0)
    # How long a job may run once a worker started it; above the workers' hard time limit (1260 s)
    # so the worker's own limit ends a stuck job first.
    job_timeout_s: int = Field(default=1500, ge=10)
    progress_edit_interval_s: float = Field(
        default=2.0,
        ge=0.1,
        validation_alias=AliasChoices("progress_edit_interval_s", "progress_interval_s"),
    )

    web_host: str = "127.0.0.1"
    web_port: int = Field(default=8080, ge=1, le=65535)
    public_url: str = "http://127.0.0.1:8080"
    # Signs the gallery's private links (stealth job pages, the Vary (Region) editor). Unset: a
    # random secret is made once and kept in web_secret_file, so links survive restarts.
    web_secret: SecretStr = SecretStr("")
    web_secret_file: Path = Field(default_factory=lambda: _data_dir() / "web_secret")
    gallery_name: str = Field(default="Mirage", min_length=1, max_length=60)
    # A hex colour; the "#" is optional because .env files and compose read "#" as a comment.
    gallery_accent: str = Field(default="#8ab4ff", pattern=r"^#?(?:[0-9a-fA-F]{3}|[0-9a-fA-F]{6})$")
    # A path on the gallery's own origin (the pages load nothing from elsewhere), e.g. /brand/logo.png.
    gallery_logo: str = Field(default="", pattern=r"^(?:/[A-Za-z0-9._~%-][A-Za-z0-9._~%/-]*)?$")
    keep_metadata: bool = False
    log_json: bool = False
    log_level: str = "INFO"

    # Images members give (attachments, URLs in prompts): byte cap, whole-fetch time cap, redirects.
    image_fetch_max_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    image_fetch_timeout_s: float = Field(default=20.0, gt=0)
    image_fetch_max_redirects: int = Field(default=3, ge=0, le=10)

    # Content rules (bot/banned_words.py, bot/content_rules.py).
    banned_words: str = ""  # comma-separated words, phrases or prefixes ending in *
    banned_words_file: Path | None = None  # one term a line, # starts a comment
    # What happens to a result the workers' image classifier flagged, outside NSFW channels.
    safety_action: Literal["block", "spoiler"] = "block"
    safety_allow_nsfw_channels: bool = True  # age-restricted channels get flagged results as they are

    # Crash recovery and timeouts (bot/supervisor.py, docs/reliability.md). A running job whose
    # worker heartbeat has not changed for heartbeat_stale_s is put back in line, at most
    # max_resends times; a job waits at the broker up to max_queue_wait_s before it is refunded.
    heartbeat_stale_s: float = Field(default=45.0, ge=5)
    max_resends: int = Field(default=3, ge=0)
    max_queue_wait_s: int = Field(default=6 * 3600, ge=60)

    # Who may use the bot (bot/access.py). Empty ALLOWED_GUILD_IDS: any guild (a warning at start).
    allowed_guild_ids: Annotated[list[int], NoDecode] = Field(default_factory=list)
    leave_unapproved_guilds: bool = False
    owner_user_ids: Annotated[list[int], NoDecode] = Field(default_factory=list)
    allow_dms: bool = False

    # Credits priced by work (bot/pricing.py): today's costs are for 25 steps, 1 MP, 4 images.
    price_base_steps: int = Field(default=25, ge=1)
    price_base_megapixels: float = Field(default=1.0, gt=0)
    price_base_images: int = Field(default=4, ge=1)
    price_confirm_at: int = Field(default=4, ge=1)  # jobs costing this much ask first

    # Prometheus /metrics: on its own port (METRICS_PORT), and/or only with a bearer token.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_token: SecretStr = SecretStr("")
    # Whether OpenAI workers are deployed: only then do failure messages suggest that engine.
    openai_enabled: bool = False
    # Credits a /describe costs (a caption, no picture made).
    cost_describe: int = Field(default=0, ge=0)

    # Prompts (bot/cogs/imagine.py): the owner's style presets folder (same-named files override
    # the shipped ones) and a house style every prompt gets unless it says --style raw / --raw.
    styles_dir: Path | None = None
    house_style: str = ""
    # --v / --niji profiles: JSON or a TOML file path, {"7": {"queue": "gpu-v7", "loras": {...},
    # "style": "..."}}; see bot/profiles.py. Unset: every profile uses the default model.
    model_profiles: str = ""
    # --relax costs this fraction of a job's credits (rounded down; 0 makes relaxed jobs free).
    relax_cost_factor: float = Field(default=0.5, ge=0, le=1)
    # How long a Yes/No confirmation (several jobs, expensive jobs) waits for its member.
    confirm_expiry_s: int = Field(default=600, ge=10)

    @model_validator(mode="before")
    @classmethod
    def _warn_deprecated(cls, data: object) -> object:
        # The sources have already mapped old names onto fields, so look where operators set them.
        present = {key.lower() for key in os.environ} | (
            {str(key).lower() for key in data} if isinstance(data, dict) else set()
        )
        for old, new in DEPRECATED_NAMES.items():
            if old in present:
                log.warning("setting %s is deprecated; use %s", old.upper(), new.upper())
        return data

    @field_validator(
        "admin_user_ids", "discord_guild_ids", "allowed_guild_ids", "owner_user_ids", mode="before"
    )
    @classmethod
    def _split_ids(cls, value: object) -> object:
        # Environment variables carry lists as "1,2,3" (or "1 2 3"); accept JSON lists too. The
        # errors say which format is wanted: the message names the variable, not a traceback.
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("["):
                try:
                    return json.loads(value)
                except ValueError:
                    raise ValueError(f"not a valid JSON list; use {ID_LIST_FORMAT}") from None
            ids: list[int] = []
            for part in value.replace(" ", ",").split(","):
                if not part:
                    continue
                try:
                    ids.append(int(part))
                except ValueError:
                    raise ValueError(f"{part!r} is not a numeric id; use {ID_LIST_FORMAT}") from None
            return ids
        if isinstance(value, int):
            return [value]
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        # logging itself would only refuse an unknown level in setup_logging, with a traceback.
        level = value.strip().upper()
        if level not in logging.getLevelNamesMapping():
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return level

    @model_validator(mode="after")
    def _ports_differ(self) -> BotSettings:
        # The gallery and the metrics listener both bind WEB_HOST: one port for both would stop
        # the start with a bare "address already in use".
        if self.metrics_port is not None and self.metrics_port == self.web_port:
            raise ValueError(
                "METRICS_PORT must differ from WEB_PORT (unset it to serve /metrics on the gallery)"
            )
        return self

    @field_validator("gallery_accent")
    @classmethod
    def _hash_colour(cls, value: str) -> str:
        return value if value.startswith("#") else f"#{value}"

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, value: str) -> str:
        """Accept plain ``postgresql://`` and ``sqlite://`` URLs and pick the async drivers."""
        for plain, driver in (
            ("postgresql://", "postgresql+psycopg://"),
            ("postgres://", "postgresql+psycopg://"),
            ("sqlite://", "sqlite+aiosqlite://"),
        ):
            if value.startswith(plain):
                return driver + value[len(plain) :]
        return value

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        """The fields ``repr()`` and ``str()`` show, with the URLs' passwords masked like secrets."""
        for name, value in super().__repr_args__():
            if name in URL_FIELDS and isinstance(value, str):
                value = URL_PASSWORD[0].sub(rf"\1:{MASK}@", value)
            yield name, value


def describe_invalid(exc: ValidationError) -> str:
    """An operator's message for invalid settings: each variable at fault and what it accepts.

    pydantic's echo of the value given is left out: it may be a secret (a token, a URL with its
    password), and this text goes to the terminal or the journal unredacted.
    """
    lines = ["Invalid configuration (environment or .env):"]
    for error in exc.errors(include_url=False, include_context=False, include_input=False):
        message = error["msg"].removeprefix("Value error, ")
        # A check across settings (no location) names its variables itself.
        lines.append(f"  {str(error['loc'][0]).upper()}: {message}" if error["loc"] else f"  {message}")
    return "\n".join(lines)


@lru_cache(maxsize=1)
def get_settings() -> BotSettings:
    """The process-wide settings, read once."""
    return BotSettings()
