"""The gallery's aiohttp application: routes, validation, error pages and security headers."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.metrics import metrics_handler
from bot.settings import BotSettings
from bot.storage import MediaNotFound, MediaStore, thumbnail
from bot.web import pages, queries

log = logging.getLogger(__name__)

PAGE_SIZE = 24
MAX_PAGE = 10_000  # deeper than anyone scrolls; keeps OFFSET bounded
IMAGE_CACHE = "public, max-age=3600"

SESSIONS_KEY = web.AppKey("sessions", async_sessionmaker[AsyncSession])
STORE_KEY = web.AppKey("store", MediaStore)
SETTINGS_KEY = web.AppKey("settings", BotSettings)

# Ids are secrets.token_urlsafe output (22 chars today; the columns hold 32). Anything else is
# rejected before it reaches the database, so odd input can only ever produce a 404.
_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
_IMAGE_NAME_RE = re.compile(r"(\d{1,2})\.(png|jpg|jpeg|webp)")
_THUMB_NAME_RE = re.compile(r"(\d{1,2})\.webp")
_PAGE_RE = re.compile(r"[0-9]{1,6}")

NOT_FOUND = "Not found"

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


def _html(text: str, status: int = 200) -> web.Response:
    return web.Response(
        text=text,
        status=status,
        content_type="text/html",
        charset="utf-8",
        headers={"Cache-Control": "no-cache"},
    )


async def feed(request: web.Request) -> web.Response:
    """``/``: recent public, finished jobs, ``PAGE_SIZE`` a page (``?page=N``)."""
    number = _page_number(request)
    async with request.app[SESSIONS_KEY]() as session:
        page = await queries.tiles_page(session, number, PAGE_SIZE)
    if not page.tiles and number > 1:
        raise _not_found()
    return _html(pages.feed_page(page))


async def member(request: web.Request) -> web.Response:
    """``/m/{public_id}``: one member's public jobs."""
    public_id = _valid_id(request.match_info["public_id"])
    number = _page_number(request)
    async with request.app[SESSIONS_KEY]() as session:
        found = await queries.member_by_public_id(session, public_id)
        if found is None:
            raise _not_found()
        member_id, view = found
        page = await queries.tiles_page(session, number, PAGE_SIZE, member_id=member_id)
    if not page.tiles and number > 1:
        raise _not_found()
    return _html(pages.member_page(view, page))


async def job(request: web.Request) -> web.Response:
    """``/j/{job_id}``: a public job's page."""
    job_id = _valid_id(request.match_info["job_id"])
    async with request.app[SESSIONS_KEY]() as session:
        view = await queries.job_view(session, job_id)
    if view is None:
        raise _not_found()
    return _html(pages.job_page(view, request.app[SETTINGS_KEY].public_url))


async def _lookup_image(request: web.Request, name_re: re.Pattern[str]) -> tuple[str, queries.ImageView]:
    job_id = _valid_id(request.match_info["job_id"])
    match = name_re.fullmatch(request.match_info["name"])
    if match is None:
        raise _not_found()
    async with request.app[SESSIONS_KEY]() as session:
        image = await queries.shown_image(session, job_id, int(match.group(1)))
    if image is None:
        raise _not_found()
    return job_id, image


async def full_image(request: web.Request) -> web.Response:
    """``/i/{job_id}/{index}.png``: a stored image, as saved (metadata already stripped)."""
    job_id, image = await _lookup_image(request, _IMAGE_NAME_RE)
    store = request.app[STORE_KEY]
    try:
        data = await store.get(image.key)
    except MediaNotFound:
        log.warning("image row without stored bytes: %s", image.key)
        raise _not_found() from None
    filename = f"mirage-{job_id}-{image.index}.{image.ext}"
    return web.Response(
        body=data,
        content_type=image.content_type,
        headers={
            "Cache-Control": IMAGE_CACHE,
            "Content-Disposition": f'inline; filename="{filename}"',
        },
    )


async def thumb(request: web.Request) -> web.Response:
    """``/t/{job_id}/{index}.webp``: a cached WebP thumbnail."""
    _, image = await _lookup_image(request, _THUMB_NAME_RE)
    try:
        data = await thumbnail(request.app[STORE_KEY], image.key)
    except MediaNotFound:
        log.warning("image row without stored bytes: %s", image.key)
        raise _not_found() from None
    return web.Response(body=data, content_type="image/webp", headers={"Cache-Control": IMAGE_CACHE})


async def healthz(request: web.Request) -> web.Response:
    """``/healthz``: the process is up and serving."""
    return web.Response(text="ok", headers={"Cache-Control": "no-store"})


async def favicon(request: web.Request) -> web.Response:
    """``/favicon.svg``: served locally so the page loads nothing from elsewhere."""
    return web.Response(
        text=pages.FAVICON_SVG, content_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"}
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
        response = _html(pages.error_page(exc.status, message), status=exc.status)
        if exc.status == 405:
            allow = exc.headers.get("Allow")
            if allow:
                response.headers["Allow"] = allow
        return response
    except Exception:
        log.exception("unhandled error serving %s", request.path)
        return _html(pages.error_page(500, "Something went wrong"), status=500)


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    headers = response.headers
    headers["Content-Security-Policy"] = pages.CONTENT_SECURITY_POLICY
    headers["X-Content-Type-Options"] = "nosniff"
    headers["X-Frame-Options"] = "DENY"
    # Job and member URLs are capabilities of a sort (unguessable ids): never send them onwards.
    headers["Referrer-Policy"] = "no-referrer"
    headers["Cross-Origin-Opener-Policy"] = "same-origin"
    headers["Permissions-Policy"] = "camera=(), microphone=(), geolocation=(), interest-cohort=()"


def create_app(
    sessions: async_sessionmaker[AsyncSession], store: MediaStore, settings: BotSettings
) -> web.Application:
    """The gallery application over a migrated database and a media store."""
    app = web.Application(middlewares=[error_pages], client_max_size=64 * 1024)
    app[SESSIONS_KEY] = sessions
    app[STORE_KEY] = store
    app[SETTINGS_KEY] = settings
    app.router.add_get("/", feed)
    app.router.add_get("/m/{public_id}", member)
    app.router.add_get("/j/{job_id}", job)
    app.router.add_get("/i/{job_id}/{name}", full_image)
    app.router.add_get("/t/{job_id}/{name}", thumb)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_handler)  # Prometheus; see bot/metrics.py
    app.router.add_get("/favicon.svg", favicon)
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
