"""The OpenAI image engine behind the ``api`` queue.

``OpenAIEngine.run`` is synchronous because the Celery task calls it from a worker process. A
job's API requests (four for a dall-e-3 grid, which only allows n=1) run on a small thread pool
with the official client; every HTTP attempt, retries included, first takes a slot from the
process-wide requests-per-minute limiter. The member's callbacks (``progress``, ``cancelled``)
are only ever called from the caller's thread, so the task need not make them thread-safe.

Retries are done here, not by the client (``max_retries=0``): the client silently ignores a
``retry-after`` of 0 or above 60 s and knows nothing about the rate limiter or cancellation.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import random
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import openai
from PIL import Image, UnidentifiedImageError
from pydantic import SecretStr

from workers.openai_engine import canvas
from workers.openai_engine.errors import (
    UNAVAILABLE_MESSAGE,
    describe,
    is_retryable,
    redact,
    retry_after_s,
    to_worker_error,
)
from workers.openai_engine.models import (
    EDIT_FALLBACK_MODEL,
    ModelSpec,
    model_spec,
    nearest_size,
    size_text,
)
from workers.openai_engine.plans import (
    Call,
    Plan,
    input_image,
    plan_blend,
    plan_generate,
    plan_outpaint,
    plan_region,
    plan_variation,
)
from workers.openai_engine.ratelimit import Limiter, RateLimiter, rate_limiter_for
from workers.output import EngineOutput
from workers.schema import (
    Engine,
    EngineReport,
    ErrorCode,
    JobKind,
    JobRequest,
    Progress,
    WorkerError,
)
from workers.settings import WorkerSettings

log = logging.getLogger("workers.openai_engine")

SEED_NOTE = "The OpenAI image API has no seeds: the seed is recorded for reference only, not reproducible."
UPSCALE_NOTE = "Upscaled 2x by Lanczos resampling: the OpenAI engine has no AI upscaler."
LANCZOS = "lanczos"
MAX_DOWNLOAD = 64 * 1024 * 1024

Stop = Callable[[], bool]


class _Stopped(Exception):
    """A request abandoned because its job was cancelled or another of its requests failed."""


@dataclass
class _Outcome:
    """What one request produced: decoded RGB images, revised prompts, HTTP attempts."""

    images: list[Image.Image]
    revised_prompts: list[str]
    attempts: int


class OpenAIEngine:
    """Images from the OpenAI Images API (dall-e-3, dall-e-2, gpt-image-1) for Mirage jobs."""

    def __init__(
        self,
        client: openai.OpenAI | None,
        *,
        api_key: SecretStr | None = None,
        max_retries: int = 4,
        timeout_s: float = 120.0,
        rate_limiter: Limiter | None = None,
        sleep: Callable[[float], None] | None = None,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 8.0,
        max_retry_after_s: float = 60.0,
        poll_s: float = 0.1,
    ) -> None:
        """Prefer ``load``; the keyword arguments exist so tests can shorten waits."""
        self._client = client
        self._secret = api_key or SecretStr("")
        self._max_retries = max_retries
        self._timeout_s = timeout_s
        self._limiter: Limiter = rate_limiter or RateLimiter(50)
        self._sleep = sleep
        self._backoff_base_s = backoff_base_s
        self._backoff_max_s = backoff_max_s
        self._max_retry_after_s = max_retry_after_s
        self._poll_s = poll_s

    @classmethod
    def load(cls, settings: WorkerSettings) -> OpenAIEngine:
        """Build the engine from settings, sharing the process-wide rate limiter.

        A missing key does not fail here, so the worker still starts (and upscales, which needs
        no API); generation jobs then fail with ``ENGINE_UNAVAILABLE``.
        """
        key = settings.openai_api_key.get_secret_value().strip()
        return cls(
            make_client(settings) if key else None,
            api_key=SecretStr(key),
            max_retries=settings.openai_max_retries,
            timeout_s=settings.openai_timeout_s,
            rate_limiter=rate_limiter_for(settings),  # shared through Redis when it can be
        )

    def __repr__(self) -> str:
        return f"OpenAIEngine(configured={self._client is not None})"

    def close(self) -> None:
        """Close the HTTP connection pool."""
        if self._client is not None:
            self._client.close()

    # ------------------------------------------------------------------ public entry point

    def run(
        self,
        request: JobRequest,
        progress: Callable[[Progress], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> EngineOutput:
        """Run one job and return its images, or raise ``WorkerError`` with a member-facing reason.

        ``progress`` gets 0 % at the start, then a report after each completed API request;
        ``cancelled`` is polled while requests are in flight and between retries. The images are
        decoded RGB, not encoded: the task encodes the result once.
        """
        is_cancelled: Stop = cancelled or (lambda: False)
        report = _Reporter(request.job_id, progress)
        report(0, 0, 1)

        if request.kind is JobKind.UPSCALE:
            return self._upscale(request, report)
        if request.kind is JobKind.CROP:
            raise WorkerError(ErrorCode.BAD_INPUT, "A crop needs no engine; the bot makes it from the grid.")
        spec = model_spec(request.openai_model)
        if self._client is None:
            log.warning("OpenAI job %s refused: OPENAI_API_KEY is not set", request.job_id)
            raise WorkerError(ErrorCode.ENGINE_UNAVAILABLE, UNAVAILABLE_MESSAGE)
        if is_cancelled():
            raise WorkerError(ErrorCode.CANCELLED, "The job was cancelled.")

        plan_started = time.perf_counter()
        plan = self._plan(request, spec)
        api_started = time.perf_counter()
        outcomes = self._execute(plan, request.job_id, report, is_cancelled)
        api_done = time.perf_counter()

        images = [image for outcome in outcomes for image in outcome.images]
        if plan.finish is not None:
            images = [plan.finish(image) for image in images]
        if not images:
            raise WorkerError(ErrorCode.ENGINE_ERROR, "OpenAI returned no images. Please try again.")
        revised = [p for o in outcomes for p in o.revised_prompts]
        if revised:
            # The API rewrites dall-e-3 prompts; admins may want to see how, members do not need to.
            log.info("job %s: OpenAI revised the prompt %d time(s)", request.job_id, len(revised))
        log.info(
            "job %s: %d OpenAI request(s), %d attempt(s), model %s, size %s",
            request.job_id,
            len(plan.calls),
            sum(o.attempts for o in outcomes),
            plan.model,
            size_text(plan.size),
        )
        report(100, len(plan.calls), len(plan.calls))
        return EngineOutput(
            images=images,
            seed=request.seed,
            report=EngineReport(engine=Engine.OPENAI, model=plan.model),
            phases={
                "prepare": api_started - plan_started,
                "api": api_done - api_started,
            },
            notes=[*plan.notes, SEED_NOTE],
        )

    # ------------------------------------------------------------------ planning

    def _plan(self, request: JobRequest, spec: ModelSpec) -> Plan:
        kind = request.kind
        if kind in (JobKind.IMAGINE, JobKind.REROLL):
            return plan_generate(request, spec)
        if kind is JobKind.BLEND:
            return plan_blend(request, spec)
        if kind is JobKind.REGION:
            return plan_region(request, spec)
        image = input_image(request)
        if kind is JobKind.VARIATION:
            return plan_variation(request, spec, image)
        if kind is JobKind.ZOOM:
            scale = request.scale if request.scale is not None else 2.0
            # A new --ar counts only where the model has a size of that other shape.
            sizes = (spec if spec.edits else model_spec(EDIT_FALLBACK_MODEL)).edit_sizes
            aspect = request.params.aspect
            reshaped = nearest_size(sizes, *aspect) != nearest_size(sizes, image.width, image.height)
            layout = canvas.zoom_layout(image.size, scale, aspect if reshaped else None)
            return plan_outpaint(request, spec, image, layout, "zoom")
        if kind is JobKind.PAN:
            if request.direction is None:
                raise WorkerError(ErrorCode.BAD_INPUT, "Pan needs a direction.")
            layout = canvas.pan_layout(image.size, request.direction)
            return plan_outpaint(request, spec, image, layout, "pan")
        if kind is JobKind.SQUARE:
            if image.width == image.height:
                raise WorkerError(ErrorCode.BAD_INPUT, "This image is already square.")
            return plan_outpaint(request, spec, image, canvas.square_layout(image.size), "square")
        raise WorkerError(ErrorCode.BAD_INPUT, f"The api engine cannot run {kind.value} jobs.")

    # ------------------------------------------------------------------ execution

    def _execute(self, plan: Plan, job_id: str, report: _Reporter, is_cancelled: Stop) -> list[_Outcome]:
        """Run the plan's requests concurrently; the first failure (or a cancel) stops the rest."""
        abort = threading.Event()
        total = len(plan.calls)
        outcomes: list[_Outcome | None] = [None] * total
        executor = ThreadPoolExecutor(max_workers=min(total, 10), thread_name_prefix=f"openai-{job_id[:8]}")
        try:
            futures: dict[Future[_Outcome], int] = {
                executor.submit(self._call_with_retries, call, plan.model, abort): index
                for index, call in enumerate(plan.calls)
            }
            pending = set(futures)
            finished = 0
            while pending:
                done, pending = wait(pending, timeout=self._poll_s, return_when=FIRST_COMPLETED)
                for future in done:
                    outcomes[futures[future]] = future.result()
                    finished += 1
                    if finished < total:  # the caller reports 100 % once the images are ready
                        report(round(100 * finished / total), finished, total)
                if pending and is_cancelled():
                    raise WorkerError(ErrorCode.CANCELLED, "The job was cancelled.")
        except BaseException:
            abort.set()  # requests not yet sent are dropped; in-flight ones finish unread
            raise
        finally:
            executor.shutdown(wait=False, cancel_futures=True)
        return [o for o in outcomes if o is not None]

    def _call_with_retries(self, call: Call, model: str, abort: threading.Event) -> _Outcome:
        """Send one request, retrying 429/5xx/connection errors with backoff; runs on a pool thread."""
        attempts = self._max_retries + 1
        secret = self._secret.get_secret_value()
        assert self._client is not None
        for attempt in range(attempts):
            if abort.is_set() or not self._limiter.acquire(stop=abort.is_set):
                raise _Stopped
            try:
                response = call.send(self._client)
            except openai.APITimeoutError as exc:
                log.warning("OpenAI request timed out after %.0fs (%s)", self._timeout_s, model)
                raise to_worker_error(exc, model, secret) from None
            except openai.APIStatusError as exc:
                delay = self._retry_delay(exc, attempt) if is_retryable(exc) else None
                if delay is None or attempt == attempts - 1:
                    log.warning("OpenAI request failed (%s): %s", model, describe(exc, secret))
                    raise to_worker_error(exc, model, secret) from None
                reason = describe(exc, secret)
            except openai.APIConnectionError as exc:
                if attempt == attempts - 1:
                    log.warning("OpenAI request failed (%s): %s", model, describe(exc, secret))
                    raise to_worker_error(exc, model, secret) from None
                delay = self._backoff(attempt)
                reason = describe(exc, secret)
            except openai.OpenAIError as exc:
                log.warning("OpenAI request failed (%s): %s", model, describe(exc, secret))
                raise to_worker_error(exc, model, secret) from None
            else:
                return self._collect(response, attempt + 1)
            log.warning(
                "OpenAI request retry %d/%d in %.2fs (%s): %s",
                attempt + 1,
                self._max_retries,
                delay,
                model,
                reason,
            )
            if self._sleep is not None:
                self._sleep(delay)
            elif abort.wait(delay):
                raise _Stopped
        raise AssertionError("unreachable")  # pragma: no cover - the loop always returns or raises

    def _retry_delay(self, exc: openai.APIStatusError, attempt: int) -> float | None:
        """The server's ``retry-after`` when it sent one (None: longer than we are willing to wait)."""
        wanted = retry_after_s(exc)
        if wanted is None:
            return self._backoff(attempt)
        return wanted if wanted <= self._max_retry_after_s else None

    def _backoff(self, attempt: int) -> float:
        # Jitter keeps a dall-e-3 grid's four requests from retrying in lockstep.
        return min(self._backoff_max_s, self._backoff_base_s * 2**attempt) * (0.75 + 0.25 * random.random())

    def _collect(self, response: Any, attempts: int) -> _Outcome:
        """Decode the response's images (b64 or URL) into RGB images (no metadata survives)."""
        images: list[Image.Image] = []
        revised: list[str] = []
        for item in response.data or []:
            if item.b64_json:
                try:
                    raw = base64.b64decode(item.b64_json, validate=True)
                except (binascii.Error, ValueError):
                    raise WorkerError(ErrorCode.ENGINE_ERROR, "OpenAI returned a corrupt image.") from None
            elif item.url:
                raw = self._download(item.url)
            else:
                continue
            images.append(_decode_output(raw))
            if getattr(item, "revised_prompt", None):
                revised.append(item.revised_prompt)
        return _Outcome(images, revised, attempts)

    def _download(self, url: str) -> bytes:
        """Fetch a ``url`` response (models without b64 output); no API key is sent with it."""
        if not url.startswith(("https://", "http://")):
            raise WorkerError(ErrorCode.ENGINE_ERROR, "OpenAI returned an unusable image link.")
        try:
            with urllib.request.urlopen(url, timeout=self._timeout_s) as response:
                data = response.read(MAX_DOWNLOAD + 1)
        except TimeoutError:
            raise WorkerError(ErrorCode.TIMEOUT, "Downloading the image from OpenAI timed out.") from None
        except OSError:
            raise WorkerError(
                ErrorCode.ENGINE_ERROR, "The image could not be downloaded from OpenAI."
            ) from None
        if len(data) > MAX_DOWNLOAD:
            raise WorkerError(ErrorCode.ENGINE_ERROR, "OpenAI returned an image that is too large.")
        return data

    # ------------------------------------------------------------------ local work

    def _upscale(self, request: JobRequest, report: _Reporter) -> EngineOutput:
        """Lanczos resampling, locally: the Images API has no upscaler."""
        started = time.perf_counter()
        image = input_image(request)
        factor = request.scale if request.scale is not None else 2.0
        bigger = canvas.upscale_lanczos(image, factor)
        note = UPSCALE_NOTE if factor == 2.0 else UPSCALE_NOTE.replace("2x", f"{factor:g}x")
        report(100, 1, 1)
        return EngineOutput(
            images=[bigger],
            seed=request.seed,
            report=EngineReport(engine=Engine.OPENAI, model=LANCZOS),
            phases={"upscale": time.perf_counter() - started},
            notes=[note],
        )


class _Reporter:
    """Sends ``Progress`` to the task's callback; a failing callback never fails the job."""

    def __init__(self, job_id: str, callback: Callable[[Progress], None] | None) -> None:
        self._job_id = job_id
        self._callback = callback

    def __call__(self, percent: int, step: int, total: int) -> None:
        if self._callback is None:
            return
        try:
            self._callback(Progress(job_id=self._job_id, percent=percent, step=step, total_steps=total))
        except Exception:  # progress is cosmetic: log and carry on
            log.exception("progress callback failed for job %s", self._job_id)


def make_client(settings: WorkerSettings, *, timeout_s: float | None = None) -> openai.OpenAI:
    """The official client for these settings, with the client's own retries off (see module doc)."""
    return openai.OpenAI(
        api_key=settings.openai_api_key.get_secret_value().strip(),
        base_url=settings.openai_base_url or None,  # None: OPENAI_BASE_URL or the public API
        timeout=timeout_s if timeout_s is not None else settings.openai_timeout_s,
        max_retries=0,
    )


def check_credentials(settings: WorkerSettings, *, models: tuple[str, ...] = ()) -> str | None:
    """None if the API key works (and ``models`` are listed), else a message for admins without the key.

    Lists models, the cheapest authenticated call, with a short timeout so a worker's start is not
    held up by a slow network.
    """
    key = settings.openai_api_key.get_secret_value().strip()
    if not key:
        return "OPENAI_API_KEY is not set: the OpenAI engine is disabled until it is."
    client = make_client(settings, timeout_s=min(settings.openai_timeout_s, 15.0))
    try:
        available = {model.id for model in client.models.list()}
    except openai.AuthenticationError:
        return "OpenAI rejected OPENAI_API_KEY (401): the OpenAI engine will fail until it is fixed."
    except openai.PermissionDeniedError:
        return "OPENAI_API_KEY may not list models (403): check the key's permissions and project."
    except openai.APITimeoutError:
        return "OpenAI did not answer the credentials check in time; the OpenAI engine may not work."
    except openai.APIConnectionError:
        return "Could not reach the OpenAI API (check OPENAI_BASE_URL and the network)."
    except openai.APIStatusError as exc:
        return f"The OpenAI credentials check failed: {describe(exc, key)}"
    finally:
        client.close()
    missing = [m for m in models if m not in available]
    if missing:
        return f"OpenAI models not available to this key: {', '.join(missing)}."
    return None


# ---------------------------------------------------------------------- helpers


def _decode_output(raw: bytes) -> Image.Image:
    """An API image as RGB pixels; the API may embed C2PA provenance data, which is not kept."""
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise WorkerError(
            ErrorCode.ENGINE_ERROR, "OpenAI returned an image that could not be read."
        ) from None
    rgb.info = {}
    return rgb


__all__ = ["OpenAIEngine", "check_credentials", "make_client", "redact"]
