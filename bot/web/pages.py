"""Templates, URL helpers and the Content-Security-Policy of the gallery's pages.

Pages are Jinja2 templates under ``templates/`` with autoescaping on for every one of them:
prompts and display names are hostile input, and they only ever reach markup through ``{{ }}``.
Stylesheets and the editor's script are files under ``static/`` served by the app itself, so the
policy can stay strict: nothing inline, nothing from another origin (an S3 media origin aside).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp_jinja2
import jinja2
from aiohttp import web

from bot.settings import BotSettings
from bot.web.params import parameter_line, parameters

HERE = Path(__file__).resolve().parent
TEMPLATES_DIR = HERE / "templates"
STATIC_DIR = HERE / "static"

FAVICON_SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32">'
    '<defs><linearGradient id="g" x1="0" y1="0" x2="1" y2="1">'
    '<stop offset="0" stop-color="#ff7ab6"/><stop offset=".5" stop-color="#8ab4ff"/>'
    '<stop offset="1" stop-color="#7affd1"/></linearGradient></defs>'
    '<rect width="32" height="32" rx="9" fill="url(#g)"/></svg>'
)

KIND_LABELS = {
    "imagine": "Grid",
    "reroll": "Reroll",
    "variation": "Variation",
    "upscale": "Upscale",
    "crop": "Upscale",  # U1-U4: the image picked from a grid
    "zoom": "Zoom Out",
    "pan": "Pan",
    "square": "Make Square",
    "region": "Vary (Region)",
}


def content_security_policy(*, script: bool = False, img_origins: tuple[str, ...] = ()) -> str:
    """The policy for a page: no scripts unless ``script`` (then only the app's own files)."""
    img = " ".join(("'self'", *img_origins))
    parts = [
        "default-src 'none'",
        f"img-src {img}",
        "style-src 'self'",
    ]
    if script:
        parts += ["script-src 'self'", "connect-src 'self'"]
    parts += ["base-uri 'none'", "form-action 'self'", "frame-ancestors 'none'"]
    return "; ".join(parts)


def url_segment(value: object) -> str:
    """Percent-encode a value for use as one URL path segment."""
    return quote(str(value), safe="")


def job_url(job_id: str) -> str:
    """Path of a job's page."""
    return f"/j/{url_segment(job_id)}"


def member_url(public_id: str) -> str:
    """Path of a member's page."""
    return f"/m/{url_segment(public_id)}"


def image_url(job_id: str, index: int, ext: str = "png") -> str:
    """Path of a full image."""
    return f"/i/{url_segment(job_id)}/{int(index)}.{url_segment(ext)}"


def thumb_url(job_id: str, index: int) -> str:
    """Path of a thumbnail."""
    return f"/t/{url_segment(job_id)}/{int(index)}.webp"


def shorten(text: str, limit: int) -> str:
    """``text`` on one line, cut to ``limit`` characters with an ellipsis."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def display_name(name: str) -> str:
    """A member's name as shown; blank names read "Anonymous"."""
    return name.strip() or "Anonymous"


def kind_label(kind: str) -> str:
    """What a job kind is called on the buttons members pressed."""
    return KIND_LABELS.get(kind, kind.replace("_", " ").capitalize())


def theme_css(settings: BotSettings) -> str:
    """The owner's accent colour as a stylesheet (the setting is validated as a hex colour)."""
    return f":root{{--accent:{settings.gallery_accent}}}\n"


def setup_templates(app: web.Application, settings: BotSettings) -> None:
    """Attach the autoescaping template environment with the helpers pages use."""
    env = aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,  # every template, whatever its name
        undefined=jinja2.StrictUndefined,
        trim_blocks=False,
    )
    env.globals.update(
        job_url=job_url,
        member_url=member_url,
        image_url=image_url,
        thumb_url=thumb_url,
        shorten=shorten,
        display_name=display_name,
        kind_label=kind_label,
        parameter_line=parameter_line,
        site={"name": settings.gallery_name, "logo": settings.gallery_logo},
        noindex=False,
        query="",
        nav="",
    )


def render(
    request: web.Request, template: str, context: dict[str, Any], *, status: int = 200
) -> web.Response:
    """A rendered page, never cached by shared caches (listings change with every job)."""
    response = aiohttp_jinja2.render_template(template, request, context, status=status)
    response.headers["Cache-Control"] = "no-cache"
    return response


__all__ = [
    "FAVICON_SVG",
    "STATIC_DIR",
    "content_security_policy",
    "display_name",
    "image_url",
    "job_url",
    "kind_label",
    "member_url",
    "parameter_line",
    "parameters",
    "render",
    "setup_templates",
    "shorten",
    "theme_css",
    "thumb_url",
]
