"""The Vary (Region) editor: the page, its picture, and the submit that hands a mask to the bot.

``GET /edit/<token>`` serves the editor (its script and styles are the app's own static files);
``POST /edit/<token>`` takes JSON ``{"prompt", "mask"}``, checks the token, the prompt and the
mask (a PNG of the image's exact size with something marked, white = repaint), stores a clean
copy of the mask and calls the callback registered under ``REGION_JOB_KEY``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import secrets

from aiohttp import web
from PIL import Image as PILImage

from bot.signing import PURPOSE_REGION, BadToken
from bot.storage import MediaStore, MediaStoreError
from bot.web import pages, queries
from bot.web.common import (
    BAD_LINK,
    BAD_LINK_DETAIL,
    NO_REGION,
    PRIVATE_CACHE,
    REGION_JOB_KEY,
    SESSIONS_KEY,
    SIGNER_KEY,
    STORE_KEY,
    RegionRefused,
    csp,
    link_claims,
    not_found,
)
from bot.web.files import (
    STORE_RETRY_AFTER_S,
    owned_image_or_404,
    serve_key,
)

log = logging.getLogger(__name__)

MAX_EDIT_BODY = 12 * 1024 * 1024  # a base64 PNG mask of a 2048² image fits many times over
MAX_PROMPT_CHARS = 4000
MAX_MASK_PIXELS = 4096 * 4096
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


async def editor(request: web.Request) -> web.Response:
    """``/edit/{token}``: the region editor for the image the token names."""
    claims = link_claims(request, PURPOSE_REGION)
    async with request.app[SESSIONS_KEY]() as session:
        view = await queries.owned_job_view(session, claims.job_id, claims.user_id)
    image = next((i for i in view.images if i.index == claims.index), None) if view else None
    if view is None or image is None:
        raise not_found()
    token = pages.url_segment(request.match_info["token"])
    response = pages.render(
        request,
        "editor.html",
        {
            "title": "Vary (Region)",
            "noindex": True,
            "image": image,
            "image_src": f"/edit/{token}/image.{pages.url_segment(image.ext)}",
            "prompt": view.prompt,
            "max_prompt": MAX_PROMPT_CHARS,
            "expires_at": claims.expires_at,
        },
    )
    response.headers["Cache-Control"] = PRIVATE_CACHE
    response.headers["Content-Security-Policy"] = csp(request.app, script=True)
    return response


async def editor_image(request: web.Request) -> web.StreamResponse:
    """``/edit/{token}/image.png``: the picture being edited."""
    claims = link_claims(request, PURPOSE_REGION)
    image = await owned_image_or_404(request, claims, claims.index)
    if request.match_info["ext"] != image.ext:
        raise not_found()
    return await serve_key(request, image.key, image.content_type, cache=PRIVATE_CACHE)


def _json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers={"Cache-Control": "no-store"})


def normalise_mask(data: bytes, size: tuple[int, int]) -> bytes:
    """A clean 8-bit black-and-white PNG from a submitted mask, or ``ValueError`` saying why not.

    The mask must be a PNG of exactly ``size`` with something marked. Grey edges (anti-aliasing)
    become white at half brightness or more; transparent pixels count as black. Nothing of the
    upload is kept but the pixels.
    """
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("The mask is not a PNG image.")
    try:
        with PILImage.open(io.BytesIO(data)) as img:
            if img.format != "PNG":
                raise ValueError("The mask is not a PNG image.")
            if img.size != size:
                raise ValueError(f"The mask must be {size[0]}×{size[1]} pixels, the size of the image.")
            if size[0] * size[1] > MAX_MASK_PIXELS:
                raise ValueError("The mask is too large.")
            img.load()
            if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
                rgba = img.convert("RGBA")
                black = PILImage.new("RGBA", img.size, (0, 0, 0, 255))
                gray = PILImage.alpha_composite(black, rgba).convert("L")
            else:
                gray = img.convert("L")
    except (OSError, SyntaxError, PILImage.DecompressionBombError):
        raise ValueError("The mask is not a readable PNG image.") from None
    mask = gray.point(lambda value: 255 if value >= 128 else 0)
    if mask.getbbox() is None:
        raise ValueError("The mask is empty: mark the region to repaint first.")
    out = io.BytesIO()
    mask.save(out, "PNG", optimize=True)
    return out.getvalue()


async def _read_body(request: web.Request, limit: int) -> bytes:
    # The app-wide client_max_size stays small for every other route; this one reads its own
    # body with a larger, explicit bound.
    if request.content_length is not None and request.content_length > limit:
        raise ValueError("too large")
    # read(n) returns what has arrived so far, not n bytes: a body that comes in several
    # pieces is read piece by piece, up to one byte past the bound.
    body = bytearray()
    while chunk := await request.content.read(limit + 1 - len(body)):
        body += chunk
        if len(body) > limit:
            raise ValueError("too large")
    return bytes(body)


async def editor_submit(request: web.Request) -> web.Response:
    """``POST /edit/{token}``: JSON ``{"prompt", "mask"}`` (mask: base64 PNG, white = repaint)."""
    try:
        claims = request.app[SIGNER_KEY].verify(request.match_info["token"], PURPOSE_REGION)
    except BadToken as exc:
        log.info("refused a region submit: %s", exc)
        return _json_error(403, f"{BAD_LINK}. {BAD_LINK_DETAIL}")
    callback = request.app.get(REGION_JOB_KEY)
    if callback is None:
        return _json_error(503, NO_REGION)
    # Only a script can send JSON cross-origin, and only after a preflight this app never answers.
    if request.content_type != "application/json":
        return _json_error(415, "Send the edit as JSON.")
    try:
        body = await _read_body(request, MAX_EDIT_BODY)
    except ValueError:
        return _json_error(413, "The mask is too large.")
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deep
        return _json_error(400, "The request is not valid JSON.")
    if not isinstance(payload, dict) or not isinstance(payload.get("mask"), str):
        return _json_error(400, "The request has no mask.")
    prompt = payload.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return _json_error(400, "Write a prompt for the region.")
    prompt = prompt.strip()
    if len(prompt) > MAX_PROMPT_CHARS:
        return _json_error(400, f"The prompt is longer than {MAX_PROMPT_CHARS} characters.")
    try:
        raw_mask = base64.b64decode(payload["mask"], validate=True)
    except (binascii.Error, ValueError):
        return _json_error(400, "The mask is not a PNG image.")

    async with request.app[SESSIONS_KEY]() as session:
        image = await queries.owned_image(session, claims.job_id, claims.index, claims.user_id)
    if image is None:
        return _json_error(404, "That image is no longer available.")
    try:
        mask = await asyncio.to_thread(normalise_mask, raw_mask, (image.width, image.height))
    except ValueError as exc:
        return _json_error(400, str(exc))

    store = request.app[STORE_KEY]
    mask_key = f"masks/{claims.job_id}/{claims.index}-{secrets.token_hex(8)}.png"
    try:
        await store.put(mask_key, mask, "image/png")
    except MediaStoreError as exc:
        log.warning("media store unreachable for a region mask: %s", exc)
        response = _json_error(
            503, "The image store cannot be reached right now; nothing was charged. Try again."
        )
        response.headers["Retry-After"] = str(STORE_RETRY_AFTER_S)
        return response
    try:
        message = await callback(claims.user_id, claims.job_id, claims.index, prompt, mask_key)
    except RegionRefused as exc:
        await _forget_mask(store, mask_key)
        return _json_error(409, str(exc) or "The edit was refused.")
    except Exception:
        log.exception("region job callback failed for job %s", claims.job_id)
        await _forget_mask(store, mask_key)
        return _json_error(500, "Something went wrong; nothing was charged. Try again.")
    return web.json_response({"message": message}, headers={"Cache-Control": "no-store"})


async def _forget_mask(store: MediaStore, key: str) -> None:
    # An unused mask left behind costs a few kilobytes; the member's answer must not change for it.
    try:
        await store.delete(key)
    except MediaStoreError as exc:
        log.warning("could not delete the unused mask %s: %s", key, exc)
