"""``/describe``: four prompt suggestions for a picture, and the picture's ``--ar``.

Two ways to get them:

- a captioning model through transformers (``DESCRIBE_MODEL``, a hub id or local folder of a
  model that captions an image on its own: BLIP, BLIP-2), loaded with ``AutoProcessor`` and
  ``AutoModelForImageTextToText``. Four captions are sampled in one ``generate`` call from a
  seed (so 🔄 with a new seed gives new ones and a redelivered job the same ones), duplicates
  are dropped and more are sampled until four differ, with beam search as the last resort;
- a vision-capable OpenAI chat model (``OPENAI_DESCRIBE_MODEL``) through the official client,
  asked for the prompts as JSON.

Either way each suggestion is cleaned so it is safe to paste back into ``/imagine``: no
``--`` parameters or ``::`` weights can come from the model's text, only the ``--ar`` added here.

The Celery task ``mirage.describe.run`` (``TASK_DESCRIBE``, registered in :mod:`workers.tasks`)
takes a ``JobRequest`` of kind ``DESCRIBE`` with the picture in ``input_image`` and answers a
``TaskOutcome`` whose ``describe`` is a :class:`~workers.schema.DescribeResult`. A request for
the OpenAI engine (``params.engine`` openai, or an ``openai_model`` set, as the bot does for jobs
it sends to the ``api`` queue) is described by OpenAI; any other by the local captioner (``gpu``
queue), loaded once per worker process.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from workers.image_input import decode_image
from workers.schema import (
    DescribeResult,
    Engine,
    ErrorCode,
    JobError,
    JobKind,
    JobRequest,
    TaskOutcome,
    WorkerError,
    b64encode_bytes,
)
from workers.settings import WorkerSettings

log = logging.getLogger(__name__)

SUGGESTIONS = 4
MAX_RATIO_TERM = 16  # --ar terms up to 16 (16:9, 12:5); a bigger term would read as noise
RATIO_TOLERANCE = 0.01  # a simpler ratio within 1 % (in log space) beats an exact complicated one
SAMPLING_ROUNDS = 4  # rounds of sampling (each with the next seed) before falling back to beams
MAX_PROMPT_CHARS = 400
TOP_P = 0.9
REPETITION_PENALTY = 1.1

# BLIP's captioning checkpoints invent "arafed", "araffe" and kin (a known training-data
# artifact); they mean nothing and are dropped.
_ARTIFACTS = re.compile(r"\b(?:ara+f+\w*|arafed)\b", re.IGNORECASE)
# What the prompt parser would read as parameters, weights or permutations: "--", any long dash
# (it reads "–no" and "―ar" as parameters, because phones turn "--" into one), "::" and braces.
_PARAMETER_SYNTAX = re.compile(r"(?:-*[—–―][-—–―]*|--+|::|[{}])")
# "(words:1.3)" emphasis: the parser would weigh the words, and refuse a clock's "(10:30)" as a
# weight above 3. The brackets go, the words stay.
_EMPHASIS = re.compile(r"\(([^()]*?:\s*[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*)\)")
_NUMBERING = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s*")
_SPACES = re.compile(r"\s+")
# A WordPiece continuation the decoder could not glue to a previous word.
_WORDPIECE = re.compile(r"(?:^|(?<=\s))##")

OPENAI_INSTRUCTIONS = (
    "You write prompts for an AI image generator. Look at the picture and write {count} different "
    "prompts that would recreate it. Each prompt is one line of at most 60 words: the subject, the "
    "setting, the medium or style, lighting and colours, as a sentence or comma-separated phrases. "
    "Do not use parameters such as --ar. Answer with JSON only: "
    '{{"prompts": ["first prompt", "second prompt", ...]}}'
)


@dataclass(frozen=True)
class Description:
    """What ``/describe`` shows: prompt texts without parameters, and the picture's aspect ratio."""

    captions: tuple[str, ...]
    aspect: tuple[int, int]

    @property
    def aspect_text(self) -> str:
        """The aspect ratio as ``--ar`` takes it, ``3:2``."""
        return f"{self.aspect[0]}:{self.aspect[1]}"

    @property
    def prompts(self) -> tuple[str, ...]:
        """Each caption with ``--ar W:H`` appended, ready for ``/imagine``."""
        return tuple(f"{caption} --ar {self.aspect_text}" for caption in self.captions)


def nearest_ratio(width: int, height: int, *, max_term: int = MAX_RATIO_TERM) -> tuple[int, int]:
    """The whole-number ratio for ``--ar``: 1500x1000 is 3:2, 1920x1080 16:9, 1024x683 3:2.

    Among ratios whose terms are at most ``max_term``, the simplest one (smallest sum of terms)
    within 1 % of the picture's ratio wins; if none is that close, the closest one does.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"a picture has positive sides, not {width}x{height}")
    target = math.log(width / height)
    best: tuple[float, int, int] | None = None
    close: tuple[int, int, int] | None = None
    for a in range(1, max_term + 1):
        for b in range(1, max_term + 1):
            if math.gcd(a, b) != 1:
                continue
            error = abs(math.log(a / b) - target)
            if best is None or error < best[0]:
                best = (error, a, b)
            if error <= RATIO_TOLERANCE and (close is None or a + b < close[0]):
                close = (a + b, a, b)
    if close is not None:
        return close[1], close[2]
    assert best is not None
    return best[1], best[2]


def clean_caption(text: str) -> str:
    """A model's caption made safe and tidy as prompt text: no parameters, weights or artifacts."""
    # The bot parses prompts after NFKC, which turns a fullwidth "－－" or a small "﹘" into
    # parameter dashes and "﹕﹕" into a weight: normalise first so those are cleaned too.
    text = unicodedata.normalize("NFKC", text)
    text = _NUMBERING.sub("", text)
    text = _PARAMETER_SYNTAX.sub(" ", text)
    while (plain := _EMPHASIS.sub(r"\1", text)) != text:  # "((red:2))" is emphasis once more
        text = plain
    text = _ARTIFACTS.sub(" ", text)
    text = _WORDPIECE.sub("", text)
    text = _SPACES.sub(" ", text).strip().strip(" .,;:\"'")
    if len(text) > MAX_PROMPT_CHARS:
        text = text[:MAX_PROMPT_CHARS].rsplit(" ", 1)[0]
    return text


def _key(text: str) -> str:
    return re.sub(r"[\W_]+", " ", text.casefold()).strip()


def add_unique(found: list[str], candidates: Iterable[str], count: int) -> None:
    """Append cleaned, non-empty candidates to ``found`` that differ from those there, up to ``count``."""
    keys = {_key(text) for text in found}
    for candidate in candidates:
        if len(found) >= count:
            return
        text = clean_caption(candidate)
        key = _key(text)
        if key and key not in keys:
            keys.add(key)
            found.append(text)


# --- captioning model ------------------------------------------------------------------------


class Captioner:
    """A captioning model and its processor, loaded once per worker process."""

    def __init__(
        self, processor: Any, model: Any, *, device: Any, dtype: Any, source: str, max_tokens: int
    ) -> None:
        self.processor = processor
        self.model = model
        self.device = device
        self.dtype = dtype
        self.source = source
        self.max_tokens = max_tokens

    def _inputs(self, image: Image.Image) -> dict[str, Any]:
        batch = self.processor(images=image.convert("RGB"), return_tensors="pt")
        return {
            key: value.to(self.device, dtype=self.dtype)
            if value.is_floating_point()
            else value.to(self.device)
            for key, value in batch.items()
        }

    def _decode(self, sequences: Any) -> list[str]:
        return [str(text) for text in self.processor.batch_decode(sequences, skip_special_tokens=True)]

    def captions(self, image: Image.Image, *, seed: int, count: int = SUGGESTIONS) -> list[str]:
        """``count`` different cleaned captions of ``image``, the same ones for the same seed.

        Fewer come back only if the model cannot say ``count`` different things even with beam
        search (a degenerate model); never an empty list unless it only produces empty text.
        """
        import torch

        inputs = self._inputs(image)
        found: list[str] = []
        devices = [self.device] if getattr(self.device, "type", "cpu") == "cuda" else []
        with torch.inference_mode():
            for round_ in range(SAMPLING_ROUNDS):
                # A private RNG state: the seed decides the captions, and nobody else's RNG moves.
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(seed + round_)
                    sequences = self.model.generate(
                        **inputs,
                        do_sample=True,
                        top_p=TOP_P,
                        repetition_penalty=REPETITION_PENALTY,
                        num_return_sequences=count,
                        max_new_tokens=self.max_tokens,
                    )
                add_unique(found, self._decode(sequences), count)
                if len(found) >= count:
                    return found
            beams = max(count * 2, 4)
            sequences = self.model.generate(
                **inputs, num_beams=beams, num_return_sequences=beams, max_new_tokens=self.max_tokens
            )
            add_unique(found, self._decode(sequences), count)
        log.info("captioner %s gave only %d different captions", self.source, len(found))
        return found

    def describe(self, image: Image.Image, *, seed: int, count: int = SUGGESTIONS) -> Description:
        """Captions and aspect ratio for ``image``."""
        captions = self.captions(image, seed=seed, count=count)
        if not captions:
            raise WorkerError(
                ErrorCode.ENGINE_ERROR, "The describe model could not put this picture into words."
            )
        return Description(tuple(captions), nearest_ratio(image.width, image.height))


def load_captioner(settings: WorkerSettings) -> Captioner:
    """Load ``DESCRIBE_MODEL`` (hub id or local folder) on the worker's device and dtype.

    Raises ``WorkerError(ENGINE_UNAVAILABLE)`` naming the setting when it cannot be loaded.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from workers.sdxl.loading import resolve_device

    source = settings.describe_model.strip()
    if not source:
        raise WorkerError(ErrorCode.ENGINE_UNAVAILABLE, "/describe is off: DESCRIBE_MODEL is not set.")
    local = Path(source).expanduser()
    if local.is_dir():
        source = str(local)
    elif local.is_absolute() or source.startswith((".", "~")) or source.count("/") > 1:
        raise WorkerError(ErrorCode.ENGINE_UNAVAILABLE, f"DESCRIBE_MODEL folder {source!r} does not exist.")
    device, dtype = resolve_device(settings)
    try:
        processor = AutoProcessor.from_pretrained(source)
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype).to(device)
    except Exception as exc:  # every load failure means the same to the member
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise WorkerError(
            ErrorCode.ENGINE_UNAVAILABLE, f"DESCRIBE_MODEL {source!r} could not be loaded: {reason}"
        ) from exc
    model.eval()
    log.info("describe model loaded from %s on %s (%s)", source, device, dtype)
    return Captioner(
        processor, model, device=device, dtype=dtype, source=source, max_tokens=settings.describe_max_tokens
    )


def describe_image(
    captioner: Captioner, data: bytes | str, *, seed: int, label: str = "the image", count: int = SUGGESTIONS
) -> Description:
    """``/describe`` for an input image (PNG bytes or base64 text from the job message)."""
    image = decode_image(data, label)
    return captioner.describe(image, seed=seed, count=count)


# --- OpenAI ----------------------------------------------------------------------------------


def _openai_prompts(content: str) -> list[str]:
    """The prompts in a chat answer: the JSON the model was asked for, else one per line."""
    try:
        parsed = json.loads(content)
    except json.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("prompts"), list):
        return [item for item in parsed["prompts"] if isinstance(item, str)]
    if isinstance(parsed, list):
        return [item for item in parsed if isinstance(item, str)]
    return [line for line in content.splitlines() if line.strip()]


def describe_openai(
    data: bytes | str,
    settings: WorkerSettings,
    *,
    count: int = SUGGESTIONS,
    label: str = "the image",
    client: Any = None,
) -> Description:
    """``/describe`` through a vision-capable OpenAI chat model (``OPENAI_DESCRIBE_MODEL``).

    The picture is sent re-encoded as PNG in a data URL, never as a link. API failures become
    the same member-facing ``WorkerError`` the OpenAI image engine uses.
    """
    import io

    import openai

    from workers.openai_engine.engine import make_client
    from workers.openai_engine.errors import describe as describe_error
    from workers.openai_engine.errors import to_worker_error

    image = decode_image(data, label)
    model = settings.openai_describe_model
    secret = settings.openai_api_key.get_secret_value().strip()
    if not secret and client is None:
        raise WorkerError(
            ErrorCode.ENGINE_UNAVAILABLE, "/describe with OpenAI needs OPENAI_API_KEY on the worker."
        )
    png = io.BytesIO()
    image.save(png, "PNG")
    messages = [
        {"role": "system", "content": OPENAI_INSTRUCTIONS.format(count=count)},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": f"Write {count} prompts for this picture."},
                {
                    "type": "image_url",
                    "image_url": {
                        "url": f"data:image/png;base64,{b64encode_bytes(png.getvalue())}",
                        "detail": "low",
                    },
                },
            ],
        },
    ]
    own = client is None
    if own:
        client = make_client(settings).with_options(max_retries=settings.openai_max_retries)
    try:
        response = client.chat.completions.create(
            model=model,
            messages=messages,
            response_format={"type": "json_object"},
            max_completion_tokens=800,
        )
    except openai.OpenAIError as exc:
        log.warning("OpenAI describe failed: %s", describe_error(exc, secret))
        raise to_worker_error(exc, model, secret) from exc
    finally:
        if own:
            client.close()
    content = (response.choices[0].message.content or "") if response.choices else ""
    found: list[str] = []
    add_unique(found, _openai_prompts(content), count)
    if not found:
        raise WorkerError(ErrorCode.ENGINE_ERROR, f"{model} gave no usable description of this picture.")
    return Description(tuple(found), nearest_ratio(image.width, image.height))


# --- the task ------------------------------------------------------------------------------------

_captioners: dict[int, Captioner] = {}  # by pid: a model must not be shared across a fork
_captioner_lock = threading.Lock()


def shared_captioner(settings: WorkerSettings) -> Captioner:
    """This process's captioner for ``DESCRIBE_MODEL``, loaded on first use and kept."""
    pid = os.getpid()
    with _captioner_lock:
        captioner = _captioners.get(pid)
        if captioner is None or captioner.source != _source(settings.describe_model):
            captioner = load_captioner(settings)
            _captioners.clear()
            _captioners[pid] = captioner
        return captioner


def _source(model: str) -> str:
    local = Path(model.strip()).expanduser()
    return str(local) if local.is_dir() else model.strip()


def describe_request(request: JobRequest, settings: WorkerSettings) -> DescribeResult:
    """``/describe`` for a DESCRIBE job: OpenAI for an OpenAI job, else the local captioner."""
    if request.kind is not JobKind.DESCRIBE:
        raise WorkerError(ErrorCode.BAD_INPUT, f"The describe task does not run {request.kind} jobs.")
    if not request.input_image:
        raise WorkerError(ErrorCode.BAD_INPUT, "/describe needs a picture.")
    started = time.perf_counter()
    if request.params.engine is Engine.OPENAI or request.openai_model is not None:
        description = describe_openai(request.input_image, settings, label="the picture")
        model = settings.openai_describe_model
    else:
        captioner = shared_captioner(settings)
        description = describe_image(captioner, request.input_image, seed=request.seed, label="the picture")
        model = captioner.source
    return DescribeResult(
        job_id=request.job_id,
        prompts=list(description.prompts),
        aspect=description.aspect_text,
        model=model,
        generation_s=round(time.perf_counter() - started, 3),
    )


def describe_outcome(task_id: str, raw: Any, settings: WorkerSettings) -> dict[str, Any]:
    """The ``mirage.describe.run`` task's body: a ``TaskOutcome`` dict with ``describe`` or ``error``.

    Failures come back as a ``JobError``, as the image tasks' do, so the bot always gets a reason.
    """
    from celery.exceptions import SoftTimeLimitExceeded
    from pydantic import ValidationError

    from workers.tasks import BAD_MESSAGE, ENGINE_ERROR_MESSAGE, TIMEOUT_MESSAGE, version_mismatch

    job_id = task_id or (str(raw.get("job_id", "")) if isinstance(raw, dict) else "") or "unknown"

    def failed(code: ErrorCode, message: str) -> dict[str, Any]:
        error = JobError(job_id=job_id, code=code, message=message)
        return TaskOutcome(error=error).model_dump(mode="json")

    mismatch = version_mismatch(raw)
    if mismatch is not None:
        return failed(ErrorCode.ENGINE_UNAVAILABLE, mismatch)
    try:
        request = JobRequest.model_validate(raw)
        job_id = request.job_id
        result = describe_request(request, settings)
    except ValidationError as exc:
        fields = sorted({".".join(map(str, e["loc"])) or "message" for e in exc.errors()})
        return failed(ErrorCode.BAD_INPUT, f"{BAD_MESSAGE} ({', '.join(fields)})")
    except WorkerError as exc:
        log.info("describe %s failed: %s", job_id, exc.code)
        return failed(exc.code, exc.message)
    except SoftTimeLimitExceeded:
        return failed(ErrorCode.TIMEOUT, TIMEOUT_MESSAGE)
    except Exception:
        log.exception("describe %s: engine error", job_id)
        return failed(ErrorCode.ENGINE_ERROR, ENGINE_ERROR_MESSAGE)
    log.info("describe %s finished by %s in %.2fs", job_id, result.model, result.generation_s)
    return TaskOutcome(describe=result).model_dump(mode="json")
