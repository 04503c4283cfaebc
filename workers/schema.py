"""The job message schema shared by the bot and the workers.

Plain data only: this module must never import torch, diffusers, discord or SQLAlchemy, because
both sides import it and the bot image ships without torch. Messages cross the broker as JSON,
so every model here round-trips through ``model_dump(mode="json")`` / ``model_validate``.
"""

from __future__ import annotations

import base64
import math
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Both sides check it: a worker refuses a request, and the bot a result, of another version.
SCHEMA_VERSION = 2

# Celery task names: the bot dispatches by name so it never imports worker code.
TASK_SDXL = "mirage.sdxl.run"
TASK_OPENAI = "mirage.openai.run"
# /describe runs on either queue: on ``gpu`` with the local captioner, on ``api`` with OpenAI.
TASK_DESCRIBE = "mirage.describe.run"
QUEUE_GPU = "gpu"
QUEUE_API = "api"

MAX_SEED = 4_294_967_295
GRID_SIZE = 4
BASE_RESOLUTION = 1024  # SDXL's native side; buckets below are expressed at this size.

# SDXL's multi-aspect training buckets (SDXL paper, appendix), width x height at 1024 base.
SDXL_BUCKETS: tuple[tuple[int, int], ...] = (
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664),
    (640, 1600), (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280),
    (832, 1216), (832, 1152), (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024),
    (1024, 960), (1088, 960), (1088, 896), (1152, 896), (1152, 832), (1216, 832), (1280, 768),
    (1344, 768), (1344, 704), (1408, 704), (1472, 704), (1536, 640), (1600, 640), (1664, 576),
    (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512), (2048, 512),
)  # fmt: skip


class Engine(StrEnum):
    """Which image engine runs a job."""

    SDXL = "sdxl"
    OPENAI = "openai"

    @classmethod
    def _missing_(cls, value: object) -> Engine | None:
        # Rows and messages written before the OpenAI engine got its one name say "dalle".
        if isinstance(value, str) and value.lower() in LEGACY_ENGINE_NAMES:
            return cls.OPENAI
        return None


LEGACY_ENGINE_NAMES = frozenset({"dalle", "dall-e", "dall_e", "api"})


class Visibility(StrEnum):
    """Whether a job may appear in public listings."""

    PUBLIC = "public"
    STEALTH = "stealth"


class Sampler(StrEnum):
    """Scheduler names a member may ask for with ``--sampler``."""

    DPM = "dpm"  # DPM++ 2M Karras
    EULER = "euler"
    EULER_A = "euler_a"
    DDIM = "ddim"
    DDPM = "ddpm"


class JobKind(StrEnum):
    """What a job does; every button press and command is one of these."""

    IMAGINE = "imagine"
    REROLL = "reroll"
    VARIATION = "variation"
    UPSCALE = "upscale"
    ZOOM = "zoom"
    PAN = "pan"
    SQUARE = "square"
    CROP = "crop"  # U#: a crop of the parent grid, no generation
    BLEND = "blend"  # /blend: 2-5 images in references["prompt"], no text needed
    DESCRIBE = "describe"  # /describe: four prompts for input_image (task TASK_DESCRIBE)
    REGION = "region"  # Vary (Region): repaint mask_image's white area of input_image


class ReferenceRole(StrEnum):
    """Roles of the reference images a job carries in ``JobRequest.references``."""

    PROMPT = "prompt"  # image prompts before the text, and /blend's images (--iw)
    STYLE = "style"  # --sref (--sw)
    CHARACTER = "character"  # --cref (--cw)
    OMNI = "omni"  # --oref (--ow)


MAX_BLEND_IMAGES = 5


class Direction(StrEnum):
    """Pan direction."""

    LEFT = "left"
    RIGHT = "right"
    UP = "up"
    DOWN = "down"


class PromptPart(BaseModel):
    """One part of a multi-prompt (``a red fox::2 snow::1``) as the engines receive it.

    ``weight`` is normalised so the positive parts of a prompt sum to 1; a negative weight sends
    the part to the negative side. ``emphasis`` optionally splits ``text`` into pieces whose
    concatenation is exactly ``text``, each with a token weight (``(word:1.3)`` emphasis);
    empty means every token has weight 1.
    """

    model_config = ConfigDict(frozen=True)

    text: str
    weight: float = 1.0
    emphasis: tuple[tuple[str, float], ...] = ()


Speed = Literal["fast", "relax", "turbo"]


class GenerationParams(BaseModel):
    """What a member asked for: the prompt and its Midjourney-style parameters, validated.

    ``prompt`` is the text as the member reads it (multi-prompt weights included); the engines
    read :attr:`model_prompt` / :attr:`model_negative` or the weighted :attr:`parts`. Every field
    has a default, so messages written before a field existed still validate.
    """

    model_config = ConfigDict(frozen=True)

    prompt: str
    negative_prompt: str = ""
    aspect: tuple[int, int] = (1, 1)
    width: int = 1024  # bucket width at BASE_RESOLUTION; engines rescale to their own base
    height: int = 1024
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    chaos: int = Field(default=0, ge=0, le=100)
    stylize: int = Field(default=100, ge=0, le=1000)
    quality: float = 1.0
    steps: int | None = Field(default=None, ge=1, le=150)
    sampler: Sampler = Sampler.DPM
    tile: bool = False
    engine: Engine | None = None  # None: the member's or server's default
    visibility: Visibility | None = None  # None: the member's default
    # Weighted multi-prompt parts (negative weights go to the negative side); empty: ``prompt``.
    parts: tuple[PromptPart, ...] = ()
    image_prompts: tuple[str, ...] = ()  # image URLs written before the text, not yet fetched
    image_weight: float | None = Field(default=None, ge=0, le=3)  # --iw
    # Model profile a member asked for ("7", "6.1", "niji 6"); the worker's config maps it to
    # a checkpoint. None: the server's default model.
    model_profile: str | None = None
    speed: Speed | None = None  # --fast / --relax / --turbo; None: the member's default
    style: str | None = None  # style preset name (--style cinematic)
    raw: bool = False  # --style raw / --raw: no house style
    guidance: float | None = Field(default=None, gt=0, le=30)  # set by style presets; wins over stylize
    stop: int = Field(default=100, ge=10, le=100)  # finish at this percent of the steps
    weird: int = Field(default=0, ge=0, le=3000)
    draft: bool = False
    experimental: int | None = Field(default=None, ge=0, le=100)  # --exp, no SDXL equivalent
    style_refs: tuple[str, ...] = ()  # --sref: URLs, style codes or "random"
    style_weight: int | None = Field(default=None, ge=0, le=1000)  # --sw
    style_version: int | None = None  # --sv
    character_refs: tuple[str, ...] = ()  # --cref URLs
    character_weight: int | None = Field(default=None, ge=0, le=100)  # --cw
    omni_ref: str | None = None  # --oref URL
    omni_weight: int | None = Field(default=None, ge=1, le=1000)  # --ow
    personalize: tuple[str, ...] | None = None  # --p; () means "my default profile"

    @property
    def model_prompt(self) -> str:
        """The positive text without weights or emphasis syntax (the OpenAI engine's prompt)."""
        if not self.parts:
            return self.prompt
        return ", ".join(part.text for part in self.parts if part.weight > 0 and part.text)

    @property
    def model_negative(self) -> str:
        """The negative text: ``--no`` plus the negative-weight parts, without weights."""
        texts = [self.negative_prompt] if self.negative_prompt else []
        texts += [part.text for part in self.parts if part.weight < 0 and part.text]
        return ", ".join(texts)

    @property
    def step_count(self) -> int:
        """Sampling steps: ``--steps`` wins, else ``--quality`` scales the default 25."""
        return self.steps if self.steps is not None else quality_steps(self.quality)

    @property
    def guidance_scale(self) -> float:
        """Classifier-free guidance: a style preset's value, else derived from ``--stylize``."""
        return self.guidance if self.guidance is not None else stylize_guidance(self.stylize)


class JobRequest(BaseModel):
    """One unit of work sent to a worker. Ids and parameters only, never live objects."""

    version: int = SCHEMA_VERSION
    job_id: str
    kind: JobKind
    params: GenerationParams
    seed: int = Field(ge=0, le=MAX_SEED)  # resolved: the grid uses seed..seed+3
    count: int = GRID_SIZE  # images to produce (1 for upscale)
    strength: float | None = None  # img2img denoise for vary / upscale
    scale: float | None = None  # zoom factor (2.0, 1.5) or upscale factor
    direction: Direction | None = None  # pan
    input_image: str | None = None  # base64 PNG for variation / upscale / zoom / pan / square
    openai_model: str | None = None  # dall-e-3, dall-e-2, gpt-image-1 for the api engine
    # Reference pictures by ReferenceRole value ("prompt", "style", "character", "omni"): base64
    # PNG from the bot's media store, never URLs. Weights are GenerationParams' --iw/--sw/--cw/--ow.
    references: dict[str, list[str]] = Field(default_factory=dict)
    # REGION: base64 PNG the size of input_image, white = repaint, black = keep.
    mask_image: str | None = None

    def reference_images(self, role: ReferenceRole | str) -> list[str]:
        """The base64 pictures of one role (empty when the job has none)."""
        return list(self.references.get(str(role), []))


class ImageFormat(StrEnum):
    """How a result image is encoded; the bot stores the bytes as they are."""

    PNG = "png"
    WEBP = "webp"


class Layout(StrEnum):
    """What a result image is: Midjourney's 2x2 grid of four tiles, or one image."""

    GRID = "grid"
    SINGLE = "single"


class ImageOut(BaseModel):
    """One encoded image file (no metadata), carried as base64 text."""

    data_b64: str
    format: ImageFormat = ImageFormat.PNG
    width: int = Field(gt=0)
    height: int = Field(gt=0)


class Timings(BaseModel):
    """Where a job's time went on the worker, in seconds.

    ``generation_s`` is the engine's own work (what the generation-time metric shows);
    ``phases`` breaks it down per engine (``text_encode``, ``denoise``, ``vae_decode``, ``api``...).
    """

    load_s: float = Field(default=0.0, ge=0)  # engine load paid by this job (0 when warm)
    generation_s: float = Field(ge=0)
    encode_s: float = Field(default=0.0, ge=0)
    total_s: float = Field(ge=0)  # task start to result
    phases: dict[str, float] = Field(default_factory=dict)


class EngineReport(BaseModel):
    """What produced the images, for the job page and the logs."""

    engine: Engine
    model: str
    device: str | None = None
    dtype: str | None = None
    sampler: str | None = None
    steps: int | None = None


class SafetyVerdict(BaseModel):
    """What the worker's image classifier said about one image.

    ``label`` is the classifier's top label, ``score`` the probability that the image belongs
    to one of the unsafe labels, and ``unsafe`` whether that reached the configured threshold.
    """

    label: str
    score: float = Field(ge=0, le=1)
    unsafe: bool


class JobResult(BaseModel):
    """What a worker returns for a finished job.

    A grid arrives as one image, composed and encoded once on the worker; tiles are cut from it
    only when a member asks for one. ``notes`` are short member-facing remarks ("--tile is not
    supported by this engine") shown under the result.
    """

    version: int = SCHEMA_VERSION
    job_id: str
    layout: Layout
    image: ImageOut
    tile_width: int = Field(gt=0)
    tile_height: int = Field(gt=0)
    seed: int
    timings: Timings
    report: EngineReport
    notes: list[str] = Field(default_factory=list)
    # One verdict per generated image (each tile of a grid, in order); empty when no image
    # classifier ran. The bot decides from them whether to post, spoiler or block.
    safety: list[SafetyVerdict] = Field(default_factory=list)


class ErrorCode(StrEnum):
    """Typed failure reasons a worker reports; the bot maps each to a refund and a message."""

    BAD_INPUT = "bad_input"  # corrupt or unusable input image, impossible parameters
    CONTENT_POLICY = "content_policy"
    ENGINE_UNAVAILABLE = "engine_unavailable"  # no model, missing API key
    ENGINE_ERROR = "engine_error"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    BLOCKED = "blocked"  # this server's own image safety filter withheld the result
    STORAGE = "storage_unavailable"  # the bot's media store could not keep or read an image


class JobError(BaseModel):
    """A failure a worker returns instead of raising, so the bot always gets a reason."""

    job_id: str
    code: ErrorCode
    message: str  # safe to show to the member: no secrets, no traceback


class Progress(BaseModel):
    """A progress report: percent done and an optional small preview (base64 JPEG)."""

    job_id: str
    percent: int = Field(ge=0, le=100)
    step: int = 0
    total_steps: int = 0
    preview: str | None = None
    # Heartbeat: the worker node running the job and when it last said so (unix seconds). A
    # running task refreshes them every HEARTBEAT_INTERVAL_S even between progress reports, so
    # a heartbeat that stops advancing means the worker is gone, not slow.
    worker: str | None = None
    heartbeat_at: float | None = None


def quality_steps(quality: float) -> int:
    """Map Midjourney's ``--quality`` (.25, .5, 1, 2) to a step count (25 at 1)."""
    return max(1, round(25 * quality))


def stylize_guidance(stylize: int) -> float:
    """Map ``--stylize`` (0..1000) to guidance: 7.0 at the default 100, looser as it grows.

    Midjourney's higher stylize trades prompt adherence for its own aesthetic, which on SDXL is
    lower classifier-free guidance: 9.0 at 0, 7.0 at 100, about 5.1 at 1000.
    """
    return round(9.0 - 2.0 * math.log10(1 + 9 * stylize / 100), 3)


def nearest_bucket(ratio_w: int, ratio_h: int) -> tuple[int, int]:
    """The SDXL training bucket (at 1024 base) whose ratio is closest to ``ratio_w:ratio_h``."""
    target = math.log(ratio_w / ratio_h)
    return min(SDXL_BUCKETS, key=lambda wh: abs(math.log(wh[0] / wh[1]) - target))


def scale_bucket(width: int, height: int, base: int) -> tuple[int, int]:
    """Rescale a 1024-base bucket to a model whose native side is ``base`` (64 for the tiny model).

    Sides stay multiples of 64 at full size, and of 16 at any size, so the VAE and the UNet's
    downsampling both divide them evenly.
    """
    multiple = max(16, 64 * base // BASE_RESOLUTION)
    factor = base / BASE_RESOLUTION
    w = max(multiple, round(width * factor / multiple) * multiple)
    h = max(multiple, round(height * factor / multiple) * multiple)
    return w, h


def b64encode_bytes(data: bytes) -> str:
    """Bytes (an encoded image file) to the base64 text carried in messages."""
    return base64.b64encode(data).decode("ascii")


def b64decode_text(text: str) -> bytes:
    """Base64 text from a message back to the bytes it carries."""
    return base64.b64decode(text.encode("ascii"), validate=True)


class DescribeResult(BaseModel):
    """What ``/describe`` returns: prompt suggestions (``--ar`` included) and the picture's ratio."""

    version: int = SCHEMA_VERSION
    job_id: str
    prompts: list[str]  # usually 4, each ending in "--ar W:H"
    aspect: str  # "3:2", as --ar takes it
    model: str = ""  # the captioner or chat model that wrote them
    generation_s: float = Field(default=0.0, ge=0)


class TaskOutcome(BaseModel):
    """What every task returns: exactly one of ``result``, ``describe`` or ``error``.

    Tasks return known failures instead of raising them, so the bot never has to unpickle a
    worker's exception class to decide on a refund. ``describe`` comes only from
    ``TASK_DESCRIBE``.
    """

    result: JobResult | None = None
    error: JobError | None = None
    describe: DescribeResult | None = None


class WorkerError(Exception):
    """Raised inside workers for failures with a member-facing reason; tasks turn it into JobError."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class JobFailed(Exception):
    """What a task raises for a job that ended with a ``JobError``: the task ends in FAILURE.

    Its arguments are plain strings, ``(code, message)``, so Celery's JSON result serialiser
    stores it as ``{"exc_type": "JobFailed", "exc_module": "workers.schema", "exc_message":
    [code, message]}`` and the bot rebuilds it without torch (see :meth:`from_exception`).
    ``message`` is member-safe.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(str(code), message)
        self.code = str(code)
        self.message = message

    @property
    def error_code(self) -> ErrorCode:
        """The code as an ``ErrorCode``; an unknown one (a newer worker) reads as ENGINE_ERROR."""
        try:
            return ErrorCode(self.code)
        except ValueError:
            return ErrorCode.ENGINE_ERROR

    @classmethod
    def from_exception(cls, exc: object) -> JobFailed | None:
        """``exc`` as a JobFailed, or None when it is another exception.

        Celery rebuilds a stored exception from its module when that module is imported, and
        otherwise as a stand-in class of the same name with the same arguments: both are read.
        """
        if isinstance(exc, cls):
            return exc
        if isinstance(exc, BaseException) and type(exc).__name__ == cls.__name__:
            args = exc.args
            if len(args) == 2 and all(isinstance(arg, str) for arg in args):
                return cls(args[0], args[1])
        return None
