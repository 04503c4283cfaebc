"""The gallery's aiohttp application: the route table, error pages and security headers.

Public routes show only public, finished jobs (``bot.web.queries``). Two routes open more, and
only with a signed token (``bot.signing``) made for the job's owner: ``/p/<token>``, a private
job page (stealth jobs included), and ``/edit/<token>``, the Vary (Region) editor, whose submit
hands the mask to the callback the Discord side registers under ``REGION_JOB_KEY``.
"""

from __future__ import annotations

import asyncio
import logging
import re
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.metrics import add_metrics
from bot.settings import BotSettings
from bot.signing import Signer, signer_from_settings
from bot.storage import MediaStore, S3MediaStore
from bot.web import editor, files, pages, views
from bot.web.common import (
    BAD_LINK_DETAIL,
    IMG_ORIGINS_KEY,
    NOT_FOUND,
    PAGE_SIZE,
    REGION_JOB_KEY,
    SESSIONS_KEY,
    SETTINGS_KEY,
    SIGNER_KEY,
    STORE_KEY,
    Handler,
    RegionJobCallback,
    RegionRefused,
    csp,
)

# What the rest of the bot imports from here.
__all__ = [
    "PAGE_SIZE",
    "REGION_JOB_KEY",
    "SIGNER_KEY",
    "RegionJobCallback",
    "RegionRefused",
    "create_app",
    "start_web",
]

log = logging.getLogger(__name__)


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
        detail = {403: BAD_LINK_DETAIL, 503: exc.text or ""}.get(exc.status, "")
        context = {"title": message, "status": exc.status, "message": message, "detail": detail}
        response = pages.render(request, "error.html", context, status=exc.status)
        for name in ("Allow", "Retry-After"):  # what a 405 or a 503 tells the client to do next
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
        return response
    except Exception:
        # Redacted like the access log: the error log must not hand out signed links either.
        log.exception("unhandled error serving %s", redact_path(request.path))
        return pages.render(
            request,
            "error.html",
            {"title": "Error", "status": 500, "message": "Something went wrong", "detail": ""},
            status=500,
        )


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    headers = response.headers
    # Pages that need more (the editor) set their own policy; everything else gets no script.
    headers.setdefault("Content-Security-Policy", csp(request.app))
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
        sample = urlsplit(await files.presigned_url(store, "probe.png", "image/png"))
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
    app.router.add_get("/", views.feed)
    app.router.add_get("/top", views.top)
    app.router.add_get("/m/{public_id}", views.member)
    app.router.add_get("/m/{public_id}/favourites", views.member_favourites)
    app.router.add_get("/j/{job_id}", views.job)
    app.router.add_get("/i/{job_id}/{name}", files.full_image)
    app.router.add_get("/t/{job_id}/{name}", files.thumb)
    app.router.add_get("/p/{token}", views.private_job)
    app.router.add_get("/p/{token}/i/{name}", files.private_image)
    app.router.add_get("/p/{token}/t/{name}", files.private_thumb)
    app.router.add_get("/in/{job_id}/{name}", files.input_picture)
    app.router.add_get("/p/{token}/in/{name}", files.private_input)
    app.router.add_get("/edit/{token}", editor.editor)
    app.router.add_post("/edit/{token}", editor.editor_submit)
    app.router.add_get(r"/edit/{token}/image.{ext:png|jpg|webp}", editor.editor_image)
    app.router.add_get("/healthz", healthz)
    add_metrics(app, settings)  # Prometheus, unless on METRICS_PORT; see bot/metrics.py
    app.router.add_get("/favicon.svg", favicon)
    app.router.add_get("/theme.css", theme)
    app.router.add_static("/static", pages.STATIC_DIR, append_version=False)
    app.on_startup.append(_on_startup)
    app.on_response_prepare.append(_security_headers)
    return app


_SIGNED_PATH_RE = re.compile(r"^/(p|edit)/[^/]+")


def redact_path(path: str) -> str:
    """``path`` with a signed link's token replaced: the access log must not hand out links."""
    return _SIGNED_PATH_RE.sub(r"/\1/<token>", path)


class RedactingAccessLogger(AbstractAccessLogger):
    """One line per request, without query strings or signed-link tokens."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        """Log the request's method, redacted path, status and duration."""
        self.logger.info(
            '%s "%s %s" %s %.3fs',
            request.remote,
            request.method,
            redact_path(request.path),
            response.status,
            time,
        )


async def start_web(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Serve ``app`` on ``host:port`` (0 picks a free port: see ``runner.addresses``).

    Returns the runner; ``await runner.cleanup()`` stops serving.
    """
    runner = web.AppRunner(app, access_log_class=RedactingAccessLogger)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
