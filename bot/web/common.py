"""What the gallery's route modules share: app keys, limits, id checks, signed-link checks, the CSP."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.settings import BotSettings
from bot.signing import BadToken, Claims, Signer
from bot.storage import MediaStore
from bot.web import pages

log = logging.getLogger(__name__)

PAGE_SIZE = 24
MAX_PAGE = 10_000  # deeper than anyone scrolls; keeps OFFSET bounded
IMAGE_CACHE = "public, max-age=3600"
PRIVATE_CACHE = "private, no-store"

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
IMAGE_NAME_RE = re.compile(r"(\d{1,2})\.(png|jpg|jpeg|webp)")
THUMB_NAME_RE = re.compile(r"(\d{1,2})\.webp")
INPUT_NAME_RE = re.compile(r"(\d)\.png")  # a job's input pictures: at most a handful
_PAGE_RE = re.compile(r"[0-9]{1,6}")

NOT_FOUND = "Not found"
BAD_LINK = "This link is invalid or has expired"
BAD_LINK_DETAIL = (
    "Ask the bot for a new one: links work for the member they were made for, for a limited time."
)
NO_REGION = "Vary (Region) is not available on this server right now. Try again later."

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def not_found() -> web.HTTPNotFound:
    """The one "not found" for every miss."""
    # One exception for every miss (unknown, stealth, unfinished, malformed): the middleware
    # turns it into the same page, so a hidden job is indistinguishable from a missing one.
    return web.HTTPNotFound()


def valid_id(value: str) -> str:
    """``value`` if it looks like a job or member id, else a 404."""
    if not _ID_RE.fullmatch(value):
        raise not_found()
    return value


def page_number(request: web.Request) -> int:
    """The ``?page=`` number (1 when absent); a malformed or out-of-range one is a 400."""
    raw = request.query.get("page")
    if raw is None:
        return 1
    if not _PAGE_RE.fullmatch(raw):
        raise web.HTTPBadRequest(reason="Bad page number")
    number = int(raw)
    if not 1 <= number <= MAX_PAGE:
        raise web.HTTPBadRequest(reason="Bad page number")
    return number


def link_claims(request: web.Request, purpose: str) -> Claims:
    """The claims of the ``{token}`` in the path, or a 403 page when it is not valid for ``purpose``."""
    try:
        return request.app[SIGNER_KEY].verify(request.match_info["token"], purpose)
    except BadToken as exc:
        # The reason stays in the server log; the page says the same thing for every failure.
        log.info("refused a %s link: %s", purpose, exc)
        raise web.HTTPForbidden(reason=BAD_LINK) from None


def csp(app: web.Application, *, script: bool = False) -> str:
    """The Content-Security-Policy for this app's pages (with the S3 media origin, if any)."""
    return pages.content_security_policy(script=script, img_origins=app.get(IMG_ORIGINS_KEY, ()))
