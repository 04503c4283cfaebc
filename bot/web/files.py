"""Serving stored images: files with ETag and Range support, or presigned S3 redirects.

Every route looks the image up through a visibility check (public) or a signed link (private)
before any byte or URL is handed out.
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

from aiohttp import web

from bot.media import thumbnail
from bot.signing import PURPOSE_JOB, Claims
from bot.storage import LocalMediaStore, MediaNotFound, MediaStoreError, S3MediaStore, thumbnail_key
from bot.web import queries
from bot.web.common import (
    IMAGE_CACHE,
    IMAGE_NAME_RE,
    INPUT_NAME_RE,
    PRIVATE_CACHE,
    SESSIONS_KEY,
    STORE_KEY,
    THUMB_NAME_RE,
    link_claims,
    not_found,
    valid_id,
)

log = logging.getLogger(__name__)

PRESIGNED_TTL_S = 3600
STORE_RETRY_AFTER_S = 30  # what a 503 asks the browser to wait while the media store is down


async def presigned_url(store: S3MediaStore, key: str, content_type: str) -> str:
    """A short-lived GET URL for ``key`` in the bucket (signed locally, no request made)."""
    object_key = f"{store.prefix}/{key}" if store.prefix else key
    return await asyncio.to_thread(
        store.client.generate_presigned_url,
        "get_object",
        Params={"Bucket": store.bucket, "Key": object_key, "ResponseContentType": content_type},
        ExpiresIn=PRESIGNED_TTL_S,
    )


async def serve_key(
    request: web.Request, key: str, content_type: str, *, cache: str, filename: str | None = None
) -> web.StreamResponse:
    """Serve a stored object: a file (ETag, Range, conditional requests) or an S3 redirect."""
    store = request.app[STORE_KEY]
    headers = {"Cache-Control": cache, "Content-Type": content_type}
    if filename:
        headers["Content-Disposition"] = f'inline; filename="{filename}"'
    if isinstance(store, LocalMediaStore):
        path: Path = store.path_for(key)
        if not await asyncio.to_thread(path.is_file):
            log.warning("image row without stored bytes: %s", key)
            raise not_found()
        return web.FileResponse(path, headers=headers)
    if isinstance(store, S3MediaStore):
        # The bucket serves the bytes (with its own ETag and Range support); the short-lived
        # URL is only handed out after the visibility check above it.
        url = await presigned_url(store, key, content_type)
        raise web.HTTPFound(url, headers={"Cache-Control": "private, max-age=300"})
    try:
        data = await store.get(key)
    except MediaNotFound:
        log.warning("image row without stored bytes: %s", key)
        raise not_found() from None
    except MediaStoreError as exc:
        raise store_down(exc) from None
    return web.Response(body=data, headers=headers)


def store_down(exc: MediaStoreError) -> web.HTTPServiceUnavailable:
    """A 503 that tells the browser to come back: the store is unreachable, the image is not gone."""
    log.warning("media store unreachable: %s", exc)
    return web.HTTPServiceUnavailable(
        text="The image store cannot be reached right now. Please try again in a moment.",
        headers={"Retry-After": str(STORE_RETRY_AFTER_S)},
    )


async def thumbnail_of(request: web.Request, key: str) -> str:
    """The store key of the thumbnail of ``key``, made and cached first if need be."""
    try:
        await thumbnail(request.app[STORE_KEY], key)  # made once, then cached in the store
    except MediaNotFound:
        log.warning("image row without stored bytes: %s", key)
        raise not_found() from None
    except MediaStoreError as exc:
        raise store_down(exc) from None
    return thumbnail_key(key)


def image_index(request: web.Request, name_re: re.Pattern[str]) -> int:
    """The image index in the ``{name}`` of the path, or a 404 when the name does not fit."""
    match = name_re.fullmatch(request.match_info["name"])
    if match is None:
        raise not_found()
    return int(match.group(1))


async def _lookup_image(request: web.Request, name_re: re.Pattern[str]) -> tuple[str, queries.ImageView]:
    job_id = valid_id(request.match_info["job_id"])
    index = image_index(request, name_re)
    async with request.app[SESSIONS_KEY]() as session:
        image = await queries.shown_image(session, job_id, index)
    if image is None:
        raise not_found()
    return job_id, image


async def full_image(request: web.Request) -> web.StreamResponse:
    """``/i/{job_id}/{index}.png``: a stored image, as saved (without metadata)."""
    job_id, image = await _lookup_image(request, IMAGE_NAME_RE)
    filename = f"mirage-{job_id}-{image.index}.{image.ext}"
    return await serve_key(request, image.key, image.content_type, cache=IMAGE_CACHE, filename=filename)


async def thumb(request: web.Request) -> web.StreamResponse:
    """``/t/{job_id}/{index}.webp``: a cached WebP thumbnail at the image's aspect ratio."""
    _, image = await _lookup_image(request, THUMB_NAME_RE)
    return await serve_key(request, await thumbnail_of(request, image.key), "image/webp", cache=IMAGE_CACHE)


async def owned_image_or_404(request: web.Request, claims: Claims, index: int) -> queries.ImageView:
    """Image ``index`` of the job a signed link names, if its owner is the link's member."""
    async with request.app[SESSIONS_KEY]() as session:
        image = await queries.owned_image(session, claims.job_id, index, claims.user_id)
    if image is None:
        raise not_found()
    return image


async def private_image(request: web.Request) -> web.StreamResponse:
    """``/p/{token}/i/{index}.png``: an image of a private link's job."""
    claims = link_claims(request, PURPOSE_JOB)
    image = await owned_image_or_404(request, claims, image_index(request, IMAGE_NAME_RE))
    filename = f"mirage-{claims.job_id}-{image.index}.{image.ext}"
    return await serve_key(request, image.key, image.content_type, cache=PRIVATE_CACHE, filename=filename)


async def private_thumb(request: web.Request) -> web.StreamResponse:
    """``/p/{token}/t/{index}.webp``: a thumbnail of a private link's job."""
    claims = link_claims(request, PURPOSE_JOB)
    image = await owned_image_or_404(request, claims, image_index(request, THUMB_NAME_RE))
    return await serve_key(request, await thumbnail_of(request, image.key), "image/webp", cache=PRIVATE_CACHE)


async def input_picture(request: web.Request) -> web.StreamResponse:
    """``/in/{job_id}/{n}.png``: input picture ``n`` of a shown job (stored as a clean PNG)."""
    job_id = valid_id(request.match_info["job_id"])
    position = image_index(request, INPUT_NAME_RE)
    async with request.app[SESSIONS_KEY]() as session:
        picture = await queries.shown_input(session, job_id, position)
    if picture is None:
        raise not_found()
    return await serve_key(request, picture.key, "image/png", cache=IMAGE_CACHE)


async def private_input(request: web.Request) -> web.StreamResponse:
    """``/p/{token}/in/{n}.png``: an input picture of a private link's job."""
    claims = link_claims(request, PURPOSE_JOB)
    position = image_index(request, INPUT_NAME_RE)
    async with request.app[SESSIONS_KEY]() as session:
        picture = await queries.owned_input(session, claims.job_id, position, claims.user_id)
    if picture is None:
        raise not_found()
    return await serve_key(request, picture.key, "image/png", cache=PRIVATE_CACHE)
