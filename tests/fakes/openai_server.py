"""A fake OpenAI Images API that validates requests the way the real one does.

It serves ``POST /v1/images/generations``, ``/v1/images/edits``, ``/v1/images/variations`` and
``GET /v1/models`` on 127.0.0.1 (a free port), answers with deterministic PNGs of the requested
size (``b64_json``, or a ``url`` it serves itself), records every request (edit images and masks
decoded, for alpha checks) and can be scripted to fail: the next N image requests get a 429 with
``retry-after``, a 500, a content-policy 400, or a delay. Errors use the API's JSON shape
``{"error": {"message", "type", "param", "code"}}``.

Use it from synchronous tests (``with FakeOpenAIServer(key) as server:`` runs it on its own
thread and event loop) or from async ones (``async with``, on the running loop; only for async
clients, since a blocking client on the same loop would deadlock).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import itertools
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from PIL import Image

DALLE2_SIZES = ("256x256", "512x512", "1024x1024")
MODEL_RULES: dict[str, dict[str, Any]] = {
    "dall-e-2": {
        "sizes": DALLE2_SIZES,
        "max_n": 10,
        "prompt_limit": 1000,
        "response_format": True,
        "qualities": ("standard",),
        "edits": True,
        "variations": True,
    },
    "dall-e-3": {
        "sizes": ("1024x1024", "1792x1024", "1024x1792"),
        "max_n": 1,
        "prompt_limit": 4000,
        "response_format": True,
        "qualities": ("standard", "hd"),
        "edits": False,
        "variations": False,
    },
    "gpt-image-1": {
        "sizes": ("1024x1024", "1536x1024", "1024x1536", "auto"),
        "max_n": 10,
        "prompt_limit": 32000,
        "response_format": False,
        "qualities": ("low", "medium", "high", "auto"),
        "edits": True,
        "variations": False,
    },
}
GENERATION_FIELDS = {"prompt", "model", "n", "size", "response_format", "quality", "style", "user"}
GENERATION_FIELDS_GPT = {"background", "moderation", "output_format", "output_compression"}
EDIT_FIELDS = {
    "image",
    "image[]",
    "mask",
    "prompt",
    "model",
    "n",
    "size",
    "response_format",
    "user",
    "quality",
}
EDIT_FIELDS_GPT = {"input_fidelity", "background", "output_format", "output_compression"}
VARIATION_FIELDS = {"image", "model", "n", "size", "response_format", "user"}
DALLE2_MAX_BYTES = 4 * 1024 * 1024


class ApiError(Exception):
    """An error response in the API's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}
        self.headers = headers or {}


@dataclass
class Scripted:
    """One scripted answer for the next image request: an error, or a delay before the real answer."""

    status: int | None = None  # None: answer normally (after ``delay_s``)
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


@dataclass
class RecordedRequest:
    """One request as the fake saw it, and how it answered."""

    method: str
    path: str
    headers: dict[str, str]
    fields: dict[str, Any]  # JSON body or multipart text fields (n stays as sent)
    image: Image.Image | None = None  # decoded upload (edits, variations); the last of several
    images: list[Image.Image] = field(default_factory=list)  # every image upload, in order
    mask: Image.Image | None = None
    image_bytes: int = 0
    status: int = 0
    started: float = 0.0

    @property
    def endpoint(self) -> str:
        """``generations``, ``edits``, ``variations`` or ``models``."""
        return self.path.rstrip("/").rsplit("/", 1)[-1]


class FakeOpenAIServer:
    """The fake API. ``base_url`` is what ``OPENAI_BASE_URL`` should be set to."""

    def __init__(
        self,
        api_key: str = "sk-test-fake-key-0000",
        *,
        models: tuple[str, ...] = ("dall-e-2", "dall-e-3", "gpt-image-1"),
        retired_models: tuple[str, ...] = (),
    ) -> None:
        self.api_key = api_key
        self.models = models
        self.retired_models = retired_models
        self.requests: list[RecordedRequest] = []
        self._script: deque[Scripted] = deque()
        self._files: dict[str, bytes] = {}
        # Scripted chat answers (message content), used in order; empty: an answer made from the image.
        self.chat_replies: deque[str] = deque()
        self._counter = itertools.count(1)
        self._lock = threading.Lock()
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.port = 0

    # ------------------------------------------------------------------ lifecycle

    @property
    def base_url(self) -> str:
        """The API root, ``http://127.0.0.1:PORT/v1``."""
        return f"http://127.0.0.1:{self.port}/v1"

    def make_app(self) -> web.Application:
        """The aiohttp application (for ``aiohttp.test_utils`` users)."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/images/generations", self._generations)
        app.router.add_post("/v1/images/edits", self._edits)
        app.router.add_post("/v1/images/variations", self._variations)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/files/{name}", self._file)
        return app

    async def start_async(self) -> None:
        """Start on the running loop."""
        self._runner = web.AppRunner(self.make_app(), shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop_async(self) -> None:
        """Stop the server started by ``start_async``."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def start(self) -> FakeOpenAIServer:
        """Start on a background thread with its own event loop (for synchronous clients)."""
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self.start_async())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.stop_async())
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=serve, name="fake-openai", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the fake OpenAI server did not start")
        return self

    def stop(self) -> None:
        """Stop the background server."""
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = self._thread = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> FakeOpenAIServer:
        await self.start_async()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop_async()

    # ------------------------------------------------------------------ scripting

    def script(self, *answers: Scripted) -> None:
        """Queue answers for the next image requests, in order."""
        with self._lock:
            self._script.extend(answers)

    def rate_limit_next(
        self, count: int = 1, *, retry_after: str | None = "0", code: str | None = None
    ) -> None:
        """The next ``count`` image requests get 429 (with ``retry-after`` when given)."""
        headers = {"retry-after": retry_after} if retry_after is not None else {}
        message = "Rate limit reached for images per min. Please try again later."
        if code == "insufficient_quota":
            message = "You exceeded your current quota, please check your plan and billing details."
        body = ApiError(429, message, type="requests", code=code or "rate_limit_exceeded").body
        self.script(*(Scripted(429, body, headers) for _ in range(count)))

    def server_error_next(self, count: int = 1, *, status: int = 500, retry_after: str | None = None) -> None:
        """The next ``count`` image requests get a 5xx."""
        headers = {"retry-after": retry_after} if retry_after is not None else {}
        body = ApiError(
            status, "The server had an error while processing your request.", type="server_error"
        ).body
        self.script(*(Scripted(status, body, headers) for _ in range(count)))

    def content_policy_next(self, count: int = 1, *, code: str = "content_policy_violation") -> None:
        """The next ``count`` image requests are rejected by the safety system (400)."""
        kind = "image_generation_user_error" if code == "moderation_blocked" else "invalid_request_error"
        message = "Your request was rejected as a result of our safety system."
        body = ApiError(400, message, type=kind, code=code).body
        self.script(*(Scripted(400, body) for _ in range(count)))

    def delay_next(self, count: int = 1, *, seconds: float) -> None:
        """The next ``count`` image requests answer normally, but only after ``seconds``."""
        self.script(*(Scripted(delay_s=seconds) for _ in range(count)))

    def image_requests(self, endpoint: str | None = None) -> list[RecordedRequest]:
        """Recorded image requests, optionally of one endpoint: ``generations``, ``edits``, ``variations``."""
        with self._lock:
            return [
                r
                for r in self.requests
                if r.path.startswith("/v1/images/") and (endpoint is None or r.endpoint == endpoint)
            ]

    # ------------------------------------------------------------------ handlers

    async def _models(self, request: web.Request) -> web.Response:
        record = self._record(request, {})
        try:
            self._check_auth(request)
        except ApiError as err:
            return self._error(record, err)
        data = [
            {"id": m, "object": "model", "created": 1_700_000_000, "owned_by": "system"} for m in self.models
        ]
        return self._json(record, {"object": "list", "data": data})

    async def _chat(self, request: web.Request) -> web.Response:
        """Chat completions with image input (``/describe``): validates the vision request's shape."""
        try:
            body = await request.json()
        except json.JSONDecodeError:
            body = None
        record = self._record(request, body if isinstance(body, dict) else {})
        try:
            self._check_auth(request)
            await self._scripted(record)
            messages = body.get("messages") if isinstance(body, dict) else None
            if not isinstance(messages, list) or not messages:
                raise ApiError(400, "Missing required parameter: 'messages'.", param="messages")
            assert isinstance(body, dict)
            if not isinstance(body.get("model"), str) or not body["model"]:
                raise ApiError(400, "Missing required parameter: 'model'.", param="model")
            for message in messages:
                parts = message.get("content") if isinstance(message, dict) else None
                for part in parts if isinstance(parts, list) else []:
                    if isinstance(part, dict) and part.get("type") == "image_url":
                        url = str(part.get("image_url", {}).get("url", ""))
                        if not url.startswith("data:image/") or ";base64," not in url:
                            raise ApiError(
                                400, "Invalid image URL.", param="messages", code="invalid_image_url"
                            )
                        data = base64.b64decode(url.split(";base64,", 1)[1])
                        record.image, record.image_bytes = self._open(data, "image_url"), len(data)
        except ApiError as err:
            return self._error(record, err)
        with self._lock:
            content = self.chat_replies.popleft() if self.chat_replies else None
        if content is None:
            picture = record.image.convert("RGB") if record.image else Image.new("RGB", (1, 1))
            colour = picture.resize((1, 1)).getpixel((0, 0))
            content = json.dumps({"prompts": [f"a picture in rgb{colour}, take {i}" for i in range(1, 5)]})
        return self._json(
            record,
            {
                "id": f"chatcmpl-{next(self._counter)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content, "refusal": None},
                        "finish_reason": "stop",
                        "logprobs": None,
                    }
                ],
                "usage": {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150},
            },
        )

    async def _file(self, request: web.Request) -> web.Response:
        data = self._files.get(request.match_info["name"])
        if data is None:
            raise web.HTTPNotFound()
        return web.Response(body=data, content_type="image/png")

    async def _generations(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            body = None
        record = self._record(request, body if isinstance(body, dict) else {})
        try:
            self._check_auth(request)
            await self._scripted(record)
            if not isinstance(body, dict):
                raise ApiError(400, "We could not parse the JSON body of your request.")
            model = self._model(body.get("model"))
            rules = MODEL_RULES[model]
            allowed = GENERATION_FIELDS | (GENERATION_FIELDS_GPT if model.startswith("gpt-image") else set())
            if model != "dall-e-3":
                allowed = allowed - {"style"}
            self._check_unknown(body, allowed)
            self._check_prompt(body.get("prompt"), rules)
            n = self._check_n(body.get("n", 1), model, rules)
            size = self._check_size(body.get("size", "1024x1024"), rules)
            fmt = self._check_response_format(body.get("response_format"), model, rules)
            self._check_quality(body.get("quality"), rules)
            if "style" in body and body["style"] not in ("vivid", "natural"):
                raise ApiError(400, f"Invalid style {body['style']!r}.", param="style", code="invalid_value")
        except ApiError as err:
            return self._error(record, err)
        images = [self._render(size, f"gen|{model}|{body['prompt']}|{i}") for i in range(n)]
        extra = {"revised_prompt": f"Revised: {body['prompt']}"} if model == "dall-e-3" else {}
        return self._json(record, self._images_body(images, fmt, extra))

    async def _edits(self, request: web.Request) -> web.Response:
        record = self._record(request, {})
        try:
            self._check_auth(request)
            form = await self._form(request, record)
            await self._scripted(record)
            model = self._model(form.get("model"))
            rules = MODEL_RULES[model]
            if not rules["edits"]:
                raise ApiError(400, f"Image edits are not supported for {model}.", param="model")
            allowed = EDIT_FIELDS | (EDIT_FIELDS_GPT if model.startswith("gpt-image") else set())
            self._check_unknown(form, allowed)
            self._check_prompt(form.get("prompt"), rules)
            n = self._check_n(form.get("n", "1"), model, rules)
            size = self._check_size(form.get("size", "1024x1024"), rules)
            fmt = self._check_response_format(form.get("response_format"), model, rules)
            self._check_quality(form.get("quality"), rules)
            if "input_fidelity" in form and (
                model != "gpt-image-1" or form["input_fidelity"] not in ("high", "low")
            ):
                raise ApiError(400, "Invalid input_fidelity.", param="input_fidelity", code="invalid_value")
            image = record.image
            if image is None:
                raise ApiError(
                    400,
                    "Missing required parameter: 'image'.",
                    param="image",
                    code="missing_required_parameter",
                )
            mask = record.mask
            if model == "dall-e-2":
                self._check_dalle2_upload(record, "image")
                if mask is None and "A" not in image.getbands():
                    raise ApiError(
                        400,
                        f"Invalid input image - format must be in ['RGBA', 'LA', 'L'], got {image.mode}.",
                        param="image",
                    )
            if mask is not None:
                if image.size != mask.size:
                    raise ApiError(
                        400, "Invalid mask image: the mask and image must be the same size.", param="mask"
                    )
                if "A" not in mask.getbands():
                    raise ApiError(
                        400, "Invalid mask image: the mask must have an alpha channel.", param="mask"
                    )
        except ApiError as err:
            return self._error(record, err)
        images = [
            self._render(size, f"edit|{model}|{form['prompt']}|{i}", base=image, mask=mask) for i in range(n)
        ]
        return self._json(record, self._images_body(images, fmt))

    async def _variations(self, request: web.Request) -> web.Response:
        record = self._record(request, {})
        try:
            self._check_auth(request)
            form = await self._form(request, record)
            await self._scripted(record)
            model = self._model(form.get("model"))
            rules = MODEL_RULES[model]
            if not rules["variations"]:
                raise ApiError(400, f"Image variations are not supported for {model}.", param="model")
            self._check_unknown(form, VARIATION_FIELDS)
            n = self._check_n(form.get("n", "1"), model, rules)
            size = self._check_size(form.get("size", "1024x1024"), rules)
            fmt = self._check_response_format(form.get("response_format"), model, rules)
            if record.image is None:
                raise ApiError(
                    400,
                    "Missing required parameter: 'image'.",
                    param="image",
                    code="missing_required_parameter",
                )
            self._check_dalle2_upload(record, "image")
        except ApiError as err:
            return self._error(record, err)
        images = [self._render(size, f"var|{model}|{i}") for i in range(n)]
        return self._json(record, self._images_body(images, fmt))

    # ------------------------------------------------------------------ validation

    def _check_auth(self, request: web.Request) -> None:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer ") or not header[7:].strip():
            raise ApiError(
                401,
                "You didn't provide an API key. You need to provide your API key in an Authorization "
                "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            )
        given = header[7:].strip()
        if given != self.api_key:
            # The real API echoes a masked key; the engine must not pass even this on.
            masked = f"{given[:3]}{'*' * 10}{given[-4:]}"
            raise ApiError(
                401,
                f"Incorrect API key provided: {masked}. You can find your API key at "
                "https://platform.openai.com/account/api-keys.",
                code="invalid_api_key",
            )

    def _model(self, value: Any) -> str:
        model = value or "dall-e-2"  # the real API's default for image endpoints
        if model in self.retired_models:
            raise ApiError(404, f"The model `{model}` has been deprecated.", code="model_not_found")
        if model not in MODEL_RULES:
            raise ApiError(400, f"Invalid model {model!r}.", param="model", code="invalid_value")
        return str(model)

    @staticmethod
    def _check_unknown(fields: dict[str, Any], allowed: set[str]) -> None:
        for name in fields:
            if name not in allowed:
                raise ApiError(400, f"Unknown parameter: '{name}'.", param=name, code="unknown_parameter")

    @staticmethod
    def _check_prompt(prompt: Any, rules: dict[str, Any]) -> None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ApiError(
                400,
                "Missing required parameter: 'prompt'.",
                param="prompt",
                code="missing_required_parameter",
            )
        if len(prompt) > rules["prompt_limit"]:
            raise ApiError(
                400,
                f"Invalid 'prompt': string too long. Expected a string with maximum length "
                f"{rules['prompt_limit']}, but got a string with length {len(prompt)} instead.",
                param="prompt",
                code="string_above_max_length",
            )

    @staticmethod
    def _check_n(value: Any, model: str, rules: dict[str, Any]) -> int:
        try:
            n = int(value)
        except (TypeError, ValueError):
            raise ApiError(
                400, f"Invalid type for 'n': expected an integer, got {value!r}.", param="n"
            ) from None
        if n < 1:
            raise ApiError(
                400, f"{n} is less than the minimum of 1 - 'n'", param="n", code="integer_below_min_value"
            )
        if model == "dall-e-3" and n != 1:
            raise ApiError(400, "You must provide n=1 for this model.", param="n")
        if n > rules["max_n"]:
            raise ApiError(
                400,
                f"{n} is greater than the maximum of {rules['max_n']} - 'n'",
                param="n",
                code="integer_above_max_value",
            )
        return n

    @staticmethod
    def _check_size(value: Any, rules: dict[str, Any]) -> tuple[int, int]:
        if value not in rules["sizes"]:
            raise ApiError(
                400,
                f"{value!r} is not one of {list(rules['sizes'])} - 'size'",
                param="size",
                code="invalid_value",
            )
        if value == "auto":
            return (1024, 1024)
        w, h = str(value).split("x")
        return int(w), int(h)

    @staticmethod
    def _check_response_format(value: Any, model: str, rules: dict[str, Any]) -> str:
        if value is None:
            return "b64_json" if not rules["response_format"] else "url"
        if not rules["response_format"]:
            raise ApiError(
                400,
                "Unknown parameter: 'response_format'.",
                param="response_format",
                code="unknown_parameter",
            )
        if value not in ("url", "b64_json"):
            raise ApiError(
                400,
                f"{value!r} is not one of ['url', 'b64_json'] - 'response_format'",
                param="response_format",
            )
        return str(value)

    @staticmethod
    def _check_quality(value: Any, rules: dict[str, Any]) -> None:
        if value is not None and value not in rules["qualities"]:
            raise ApiError(400, f"Invalid quality {value!r}.", param="quality", code="invalid_value")

    @staticmethod
    def _check_dalle2_upload(record: RecordedRequest, param: str) -> None:
        image = record.image
        assert image is not None
        if record.image_bytes >= DALLE2_MAX_BYTES:
            raise ApiError(400, "Uploaded image must be less than 4 MB.", param=param)
        if image.format != "PNG":
            raise ApiError(400, "Uploaded image must be a PNG.", param=param)
        if image.width != image.height:
            raise ApiError(400, "Uploaded image must be square.", param=param)

    # ------------------------------------------------------------------ plumbing

    def _record(self, request: web.Request, fields: dict[str, Any]) -> RecordedRequest:
        record = RecordedRequest(
            method=request.method,
            path=request.path,
            headers=dict(request.headers),
            fields=dict(fields),
            started=time.monotonic(),
        )
        with self._lock:
            self.requests.append(record)
        return record

    async def _form(self, request: web.Request, record: RecordedRequest) -> dict[str, Any]:
        """Multipart fields as text; the files are decoded onto ``record``."""
        if not request.content_type.startswith("multipart/"):
            raise ApiError(400, "Expected a multipart/form-data body.")
        fields: dict[str, Any] = {}
        post = await request.post()
        for name, value in post.items():
            if isinstance(value, web.FileField):
                data = value.file.read()
                fields[name] = value.filename
                image = self._open(data, name)
                if name in ("image", "image[]"):
                    record.image, record.image_bytes = image, len(data)
                    record.images.append(image)
                elif name == "mask":
                    if image.format != "PNG":
                        raise ApiError(400, "Invalid mask image: must be a PNG.", param="mask")
                    record.mask = image
            else:
                fields[name] = value
        record.fields = dict(fields)
        return fields

    @staticmethod
    def _open(data: bytes, param: str) -> Image.Image:
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except Exception:
            raise ApiError(400, f"Invalid input image - could not decode '{param}'.", param=param) from None
        return image

    async def _scripted(self, record: RecordedRequest) -> None:
        with self._lock:
            answer = self._script.popleft() if self._script else None
        if answer is None:
            return
        if answer.delay_s:
            await asyncio.sleep(answer.delay_s)
        if answer.status is not None:
            assert answer.body is not None
            err = ApiError(answer.status, answer.body["error"]["message"], headers=answer.headers)
            err.body = answer.body
            raise err

    def _error(self, record: RecordedRequest, err: ApiError) -> web.Response:
        record.status = err.status
        headers = {"x-request-id": f"req_{next(self._counter)}", **err.headers}
        return web.Response(
            status=err.status, text=json.dumps(err.body), content_type="application/json", headers=headers
        )

    def _json(self, record: RecordedRequest, body: dict[str, Any]) -> web.Response:
        record.status = 200
        return web.Response(
            text=json.dumps(body),
            content_type="application/json",
            headers={"x-request-id": f"req_{next(self._counter)}"},
        )

    def _images_body(
        self, images: list[bytes], fmt: str, extra: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        data = []
        for png in images:
            if fmt == "url":
                name = f"img-{next(self._counter)}.png"
                self._files[name] = png
                item = {"url": f"http://127.0.0.1:{self.port}/files/{name}"}
            else:
                item = {"b64_json": base64.b64encode(png).decode("ascii")}
            data.append({**item, **(extra or {})})
        return {"created": int(time.time()), "data": data}

    @staticmethod
    def _render(
        size: tuple[int, int], seed: str, *, base: Image.Image | None = None, mask: Image.Image | None = None
    ) -> bytes:
        """A deterministic PNG: a colour from ``seed``; an edit keeps the unmasked original, like the API."""
        digest = hashlib.sha256(seed.encode()).digest()
        image = Image.new("RGB", size, (digest[0], digest[1], digest[2]))
        if base is not None:
            keep = (mask if mask is not None else base).convert("RGBA").getchannel("A")
            source = base.convert("RGB")
            if source.size != size:
                source, keep = source.resize(size), keep.resize(size)
            image.paste(source, (0, 0), keep)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
