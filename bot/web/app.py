"""The gallery's aiohttp application: routes, validation, error pages and security headers.

Public routes show only public, finished jobs (``bot.web.queries``). Two routes open more, and
only with a signed token (``bot.signing``) made for the job's owner: ``/p/<token>``, a private
job page (stealth jobs included), and ``/edit/<token>``, the Vary (Region) editor, whose submit
hands the mask to the callback the Discord side registers under ``REGION_JOB_KEY``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from aiohttp import web
from PIL import Image as PILImage
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.media import thumbnail
from bot.metrics import metrics_handler
from bot.settings import BotSettings
from bot.signing import PURPOSE_JOB, PURPOSE_REGION, BadToken, Claims, Signer, signer_from_settings
from bot.storage import LocalMediaStore, MediaNotFound, MediaStore, S3MediaStore, thumbnail_key
from bot.web import pages, queries
from bot.web.search import normalise_query

log = logging.getLogger(__name__)

PAGE_SIZE = 24
MAX_PAGE = 10_000  # deeper than anyone scrolls; keeps OFFSET bounded
IMAGE_CACHE = "public, max-age=3600"
PRIVATE_CACHE = "private, no-store"
PRESIGNED_TTL_S = 3600
MAX_EDIT_BODY = 12 * 1024 * 1024  # a base64 PNG mask of a 2048² image fits many times over
MAX_PROMPT_CHARS = 4000
MAX_MASK_PIXELS = 4096 * 4096
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

RegionJobCallback = Callable[[int, str, int, str, str], Awaitable[str]]
"""``(member_user_id, job_id, image_index, prompt, mask_key) -> message for the page``."""


class RegionRefused(Exception):
    """Raised by the region callback to refuse a submission with a message for the member.

    For instance: not enough credits, or the member is not allowed to generate right now.
    """


SESSIONS_KEY = web.AppKey("sessions", async_sessionmaker[AsyncSession])
STORE_KEY = web.AppKey("store", MediaStore)
SETTINGS_KEY = web.AppKey("settings", BotSettings)
SIGNER_KEY = web.AppKey("signer", Signer)
REGION_JOB_KEY = web.AppKey("region_job", RegionJobCallback)  # type: ignore[arg-type]
IMG_ORIGINS_KEY = web.AppKey("img_origins", tuple)

# Ids are secrets.token_urlsafe output (22 chars today; the columns hold 32). Anything else is
# rejected before it reaches the database, so odd input can only ever produce a 404.
_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
_IMAGE_NAME_RE = re.compile(r"(\d{1,2})\.(png|jpg|jpeg|webp)")
_THUMB_NAME_RE = re.compile(r"(\d{1,2})\.webp")
_PAGE_RE = re.compile(r"[0-9]{1,6}")

NOT_FOUND = "Not found"
BAD_LINK = "This link is invalid or has expired"
BAD_LINK_DETAIL = (
    "Ask the bot for a new one: links work for the member they were made for, for a limited time."
)
NO_REGION = "Vary (Region) is not available on this server right now. Try again later."

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _not_found() -> web.HTTPNotFound:
    # One exception for every miss (unknown, stealth, unfinished, malformed): the middleware
    # turns it into the same page, so a hidden job is indistinguishable from a missing one.
    return web.HTTPNotFound()


def _valid_id(value: str) -> str:
    if not _ID_RE.fullmatch(value):
        raise _not_found()
    return value


def _page_number(request: web.Request) -> int:
    raw = request.query.get("page")
    if raw is None:
        return 1
    if not _PAGE_RE.fullmatch(raw):
        raise web.HTTPBadRequest(reason="Bad page number")
    number = int(raw)
    if not 1 <= number <= MAX_PAGE:
        raise web.HTTPBadRequest(reason="Bad page number")
    return number


def _page_href(path: str, number: int, **params: str) -> str:
    query = {key: value for key, value in params.items() if value}
    if number > 1:
        query["page"] = str(number)
    return f"{path}?{urlencode(query)}" if query else path


def _listing(
    request: web.Request,
    page: queries.Page,
    *,
    path: str,
    title: str,
    heading: str,
    sub: str,
    empty: str,
    show_member: bool = True,
    nav: str = "",
    query: str = "",
    tabs: list[tuple[str, str, bool]] | None = None,
) -> web.Response:
    if not page.entries and page.number > 1:
        raise _not_found()
    return pages.render(
        request,
        "listing.html",
        {
            "title": title if page.number == 1 else f"{title} · page {page.number}",
            "heading": heading,
            "sub": sub,
            "empty": empty,
            "page": page,
            "show_member": show_member,
            "nav": nav,
            "query": query,
            "tabs": tabs or [],
            "prev_href": _page_href(path, page.number - 1, q=query),
            "next_href": _page_href(path, page.number + 1, q=query),
        },
    )


async def feed(request: web.Request) -> web.Response:
    """``/``: newest public families, ``PAGE_SIZE`` a page; ``?q=`` searches prompts."""
    number = _page_number(request)
    query = normalise_query(request.query.get("q", ""))
    async with request.app[SESSIONS_KEY]() as session:
        page = await queries.entries_page(session, number, PAGE_SIZE, query=query)
    if query:
        return _listing(
            request,
            page,
            path="/",
            title=f"Search: {query}",
            heading="Search",
            sub=f"Prompts matching “{query}”",
            empty="Nothing matches that search.",
            query=query,
        )
    return _listing(
        request,
        page,
        path="/",
        title="Explore",
        heading="Explore",
        sub="Recent public creations from the community",
        empty="Nothing here yet. Public creations will appear here.",
        nav="explore",
    )


async def top(request: web.Request) -> web.Response:
    """``/top``: the most favourited public families."""
    number = _page_number(request)
    async with request.app[SESSIONS_KEY]() as session:
        page = await queries.entries_page(session, number, PAGE_SIZE, order=queries.Order.TOP)
    return _listing(
        request,
        page,
        path="/top",
        title="Top",
        heading="Top",
        sub="The community's favourites",
        empty="Nothing has been favourited yet. Press ❤️ under a picture in Discord.",
        nav="top",
    )


async def _member(request: web.Request) -> tuple[int, queries.MemberView]:
    public_id = _valid_id(request.match_info["public_id"])
    async with request.app[SESSIONS_KEY]() as session:
        found = await queries.member_by_public_id(session, public_id)
    if found is None:
        raise _not_found()
    return found


def _member_tabs(view: queries.MemberView, current: str) -> list[tuple[str, str, bool]]:
    base = pages.member_url(view.public_id)
    return [
        ("Creations", base, current == "creations"),
        ("❤️ Favourites", f"{base}/favourites", current == "fav"),
    ]


async def member(request: web.Request) -> web.Response:
    """``/m/{public_id}``: one member's public families."""
    number = _page_number(request)
    member_id, view = await _member(request)
    async with request.app[SESSIONS_KEY]() as session:
        page = await queries.entries_page(session, number, PAGE_SIZE, member_id=member_id)
    name = pages.display_name(view.display_name)
    return _listing(
        request,
        page,
        path=pages.member_url(view.public_id),
        title=name,
        heading=name,
        sub="Public creations",
        empty="No public creations yet.",
        show_member=False,
        tabs=_member_tabs(view, "creations"),
    )


async def member_favourites(request: web.Request) -> web.Response:
    """``/m/{public_id}/favourites``: the public jobs a member favourited."""
    number = _page_number(request)
    member_id, view = await _member(request)
    async with request.app[SESSIONS_KEY]() as session:
        page = await queries.favourites_page(session, member_id, number, PAGE_SIZE)
    name = pages.display_name(view.display_name)
    return _listing(
        request,
        page,
        path=f"{pages.member_url(view.public_id)}/favourites",
        title=f"{name} · favourites",
        heading=name,
        sub="Favourites",
        empty="No favourites yet.",
        tabs=_member_tabs(view, "fav"),
    )


def _job_context(job: queries.JobView, *, base: str, private: bool, og_base: str | None) -> dict[str, Any]:
    hero = job.images[0] if job.images else None
    tiles = [image for image in job.images if image.index > 0] if hero is not None and hero.index == 0 else []

    def img_src(index: int, ext: str) -> str:
        if private:
            return f"{base}/i/{int(index)}.{pages.url_segment(ext)}"
        return pages.image_url(job.job_id, index, ext)

    def thumb_src(index: int) -> str:
        return f"{base}/t/{int(index)}.webp" if private else pages.thumb_url(job.job_id, index)

    og_image = og_base.rstrip("/") + img_src(hero.index, hero.ext) if hero is not None and og_base else ""
    return {
        "title": pages.shorten(job.prompt, 70) or "Untitled",
        "job": job,
        "hero": hero,
        "tiles": tiles,
        "params": pages.parameters(job.params, job.seed),
        "img_src": img_src,
        "thumb_src": thumb_src,
        "private": private,
        "noindex": private,
        "og_image": og_image,
    }


async def job(request: web.Request) -> web.Response:
    """``/j/{job_id}``: a public job's page."""
    job_id = _valid_id(request.match_info["job_id"])
    async with request.app[SESSIONS_KEY]() as session:
        view = await queries.job_view(session, job_id)
    if view is None:
        raise _not_found()
    context = _job_context(view, base="", private=False, og_base=request.app[SETTINGS_KEY].public_url)
    return pages.render(request, "job.html", context)


def _claims(request: web.Request, purpose: str) -> Claims:
    try:
        return request.app[SIGNER_KEY].verify(request.match_info["token"], purpose)
    except BadToken as exc:
        # The reason stays in the server log; the page says the same thing for every failure.
        log.info("refused a %s link: %s", purpose, exc)
        raise web.HTTPForbidden(reason=BAD_LINK) from None


async def private_job(request: web.Request) -> web.Response:
    """``/p/{token}``: a job's page for its owner's signed link, stealth jobs included."""
    claims = _claims(request, PURPOSE_JOB)
    async with request.app[SESSIONS_KEY]() as session:
        view = await queries.owned_job_view(session, claims.job_id, claims.user_id)
    if view is None:
        raise _not_found()
    base = f"/p/{pages.url_segment(request.match_info['token'])}"
    response = pages.render(request, "job.html", _job_context(view, base=base, private=True, og_base=None))
    response.headers["Cache-Control"] = PRIVATE_CACHE
    return response


async def _presigned(store: S3MediaStore, key: str, content_type: str) -> str:
    object_key = f"{store.prefix}/{key}" if store.prefix else key
    return await asyncio.to_thread(
        store.client.generate_presigned_url,
        "get_object",
        Params={"Bucket": store.bucket, "Key": object_key, "ResponseContentType": content_type},
        ExpiresIn=PRESIGNED_TTL_S,
    )


async def _serve_key(
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
            raise _not_found()
        return web.FileResponse(path, headers=headers)
    if isinstance(store, S3MediaStore):
        # The bucket serves the bytes (with its own ETag and Range support); the short-lived
        # URL is only handed out after the visibility check above it.
        url = await _presigned(store, key, content_type)
        raise web.HTTPFound(url, headers={"Cache-Control": "private, max-age=300"})
    try:
        data = await store.get(key)
    except MediaNotFound:
        log.warning("image row without stored bytes: %s", key)
        raise _not_found() from None
    return web.Response(body=data, headers=headers)


async def _thumb_key(request: web.Request, key: str) -> str:
    try:
        await thumbnail(request.app[STORE_KEY], key)  # made once, then cached in the store
    except MediaNotFound:
        log.warning("image row without stored bytes: %s", key)
        raise _not_found() from None
    return thumbnail_key(key)


def _image_index(request: web.Request, name_re: re.Pattern[str]) -> int:
    match = name_re.fullmatch(request.match_info["name"])
    if match is None:
        raise _not_found()
    return int(match.group(1))


async def _lookup_image(request: web.Request, name_re: re.Pattern[str]) -> tuple[str, queries.ImageView]:
    job_id = _valid_id(request.match_info["job_id"])
    index = _image_index(request, name_re)
    async with request.app[SESSIONS_KEY]() as session:
        image = await queries.shown_image(session, job_id, index)
    if image is None:
        raise _not_found()
    return job_id, image


async def full_image(request: web.Request) -> web.StreamResponse:
    """``/i/{job_id}/{index}.png``: a stored image, as saved (without metadata)."""
    job_id, image = await _lookup_image(request, _IMAGE_NAME_RE)
    filename = f"mirage-{job_id}-{image.index}.{image.ext}"
    return await _serve_key(request, image.key, image.content_type, cache=IMAGE_CACHE, filename=filename)


async def thumb(request: web.Request) -> web.StreamResponse:
    """``/t/{job_id}/{index}.webp``: a cached WebP thumbnail at the image's aspect ratio."""
    _, image = await _lookup_image(request, _THUMB_NAME_RE)
    return await _serve_key(request, await _thumb_key(request, image.key), "image/webp", cache=IMAGE_CACHE)


async def _owned_image(request: web.Request, claims: Claims, index: int) -> queries.ImageView:
    async with request.app[SESSIONS_KEY]() as session:
        image = await queries.owned_image(session, claims.job_id, index, claims.user_id)
    if image is None:
        raise _not_found()
    return image


async def private_image(request: web.Request) -> web.StreamResponse:
    """``/p/{token}/i/{index}.png``: an image of a private link's job."""
    claims = _claims(request, PURPOSE_JOB)
    image = await _owned_image(request, claims, _image_index(request, _IMAGE_NAME_RE))
    filename = f"mirage-{claims.job_id}-{image.index}.{image.ext}"
    return await _serve_key(request, image.key, image.content_type, cache=PRIVATE_CACHE, filename=filename)


async def private_thumb(request: web.Request) -> web.StreamResponse:
    """``/p/{token}/t/{index}.webp``: a thumbnail of a private link's job."""
    claims = _claims(request, PURPOSE_JOB)
    image = await _owned_image(request, claims, _image_index(request, _THUMB_NAME_RE))
    return await _serve_key(request, await _thumb_key(request, image.key), "image/webp", cache=PRIVATE_CACHE)


# --- Vary (Region) --------------------------------------------------------------------------


async def editor(request: web.Request) -> web.Response:
    """``/edit/{token}``: the region editor for the image the token names."""
    claims = _claims(request, PURPOSE_REGION)
    async with request.app[SESSIONS_KEY]() as session:
        view = await queries.owned_job_view(session, claims.job_id, claims.user_id)
    image = next((i for i in view.images if i.index == claims.index), None) if view else None
    if view is None or image is None:
        raise _not_found()
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
    response.headers["Content-Security-Policy"] = _csp(request.app, script=True)
    return response


async def editor_image(request: web.Request) -> web.StreamResponse:
    """``/edit/{token}/image.png``: the picture being edited."""
    claims = _claims(request, PURPOSE_REGION)
    image = await _owned_image(request, claims, claims.index)
    if request.match_info["ext"] != image.ext:
        raise _not_found()
    return await _serve_key(request, image.key, image.content_type, cache=PRIVATE_CACHE)


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
    body = await request.content.read(limit + 1)
    if len(body) > limit or not request.content.at_eof():
        raise ValueError("too large")
    return body


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
    except (ValueError, UnicodeDecodeError):
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
    await store.put(mask_key, mask, "image/png")
    try:
        message = await callback(claims.user_id, claims.job_id, claims.index, prompt, mask_key)
    except RegionRefused as exc:
        await store.delete(mask_key)
        return _json_error(409, str(exc) or "The edit was refused.")
    except Exception:
        log.exception("region job callback failed for job %s", claims.job_id)
        await store.delete(mask_key)
        return _json_error(500, "Something went wrong; nothing was charged. Try again.")
    return web.json_response({"message": message}, headers={"Cache-Control": "no-store"})


# --- small routes ---------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    """``/healthz``: the process is up and serving."""
    return web.Response(text="ok", headers={"Cache-Control": "no-store"})


async def favicon(request: web.Request) -> web.Response:
    """``/favicon.svg``: served locally so the page loads nothing from elsewhere."""
    return web.Response(
        text=pages.FAVICON_SVG, content_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"}
    )


async def theme(request: web.Request) -> web.Response:
    """``/theme.css``: the owner's accent colour."""
    return web.Response(
        text=pages.theme_css(request.app[SETTINGS_KEY]),
        content_type="text/css",
        headers={"Cache-Control": "max-age=300"},
    )


@web.middleware
async def error_pages(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render client errors as HTML pages and never let an exception escape as a bare 500."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = NOT_FOUND if exc.status == 404 else exc.reason
        detail = BAD_LINK_DETAIL if exc.status == 403 else ""
        context = {"title": message, "status": exc.status, "message": message, "detail": detail}
        response = pages.render(request, "error.html", context, status=exc.status)
        if exc.status == 405:
            allow = exc.headers.get("Allow")
            if allow:
                response.headers["Allow"] = allow
        return response
    except Exception:
        log.exception("unhandled error serving %s", request.path)
        return pages.render(
            request,
            "error.html",
            {"title": "Error", "status": 500, "message": "Something went wrong", "detail": ""},
            status=500,
        )


def _csp(app: web.Application, *, script: bool = False) -> str:
    return pages.content_security_policy(script=script, img_origins=app.get(IMG_ORIGINS_KEY, ()))


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    headers = response.headers
    # Pages that need more (the editor) set their own policy; everything else gets no script.
    headers.setdefault("Content-Security-Policy", _csp(request.app))
    headers["X-Content-Type-Options"] = "nosniff"
    headers["X-Frame-Options"] = "DENY"
    # Job, member and signed URLs are capabilities of a sort: never send them onwards.
    headers["Referrer-Policy"] = "no-referrer"
    headers["Cross-Origin-Opener-Policy"] = "same-origin"
    headers["Permissions-Policy"] = "camera=(), microphone=(), geolocation=(), interest-cohort=()"


async def _on_startup(app: web.Application) -> None:
    if SIGNER_KEY not in app:
        # Reading (or creating) the secret file touches the disk: done once, off the loop.
        app[SIGNER_KEY] = await asyncio.to_thread(signer_from_settings, app[SETTINGS_KEY])
    store = app[STORE_KEY]
    if isinstance(store, S3MediaStore) and IMG_ORIGINS_KEY not in app:
        # Images redirect to presigned bucket URLs; the pages' img-src must allow that origin.
        sample = urlsplit(await _presigned(store, "probe.png", "image/png"))
        app[IMG_ORIGINS_KEY] = (f"{sample.scheme}://{sample.netloc}",)


def create_app(
    sessions: async_sessionmaker[AsyncSession],
    store: MediaStore,
    settings: BotSettings,
    *,
    signer: Signer | None = None,
    region_job: RegionJobCallback | None = None,
) -> web.Application:
    """The gallery application over a migrated database and a media store.

    ``signer`` defaults to one from the settings (``WEB_SECRET`` or the persisted secret), made
    when the app starts. ``region_job`` is the Vary (Region) callback; it can also be set as
    ``app[REGION_JOB_KEY]`` before the app starts. Without it the editor's submit answers 503.
    """
    app = web.Application(middlewares=[error_pages], client_max_size=64 * 1024)
    app[SESSIONS_KEY] = sessions
    app[STORE_KEY] = store
    app[SETTINGS_KEY] = settings
    if signer is not None:
        app[SIGNER_KEY] = signer
    if region_job is not None:
        app[REGION_JOB_KEY] = region_job
    pages.setup_templates(app, settings)
    app.router.add_get("/", feed)
    app.router.add_get("/top", top)
    app.router.add_get("/m/{public_id}", member)
    app.router.add_get("/m/{public_id}/favourites", member_favourites)
    app.router.add_get("/j/{job_id}", job)
    app.router.add_get("/i/{job_id}/{name}", full_image)
    app.router.add_get("/t/{job_id}/{name}", thumb)
    app.router.add_get("/p/{token}", private_job)
    app.router.add_get("/p/{token}/i/{name}", private_image)
    app.router.add_get("/p/{token}/t/{name}", private_thumb)
    app.router.add_get("/edit/{token}", editor)
    app.router.add_post("/edit/{token}", editor_submit)
    app.router.add_get(r"/edit/{token}/image.{ext:png|jpg|webp}", editor_image)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_handler)  # Prometheus; see bot/metrics.py
    app.router.add_get("/favicon.svg", favicon)
    app.router.add_get("/theme.css", theme)
    app.router.add_static("/static", pages.STATIC_DIR, append_version=False)
    app.on_startup.append(_on_startup)
    app.on_response_prepare.append(_security_headers)
    return app


async def start_web(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Serve ``app`` on ``host:port`` (0 picks a free port: see ``runner.addresses``).

    Returns the runner; ``await runner.cleanup()`` stops serving.
    """
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
