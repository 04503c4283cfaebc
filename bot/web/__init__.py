"""The web gallery: the explore feed, member and job pages, search, private links and the editor.

The application is imported on first use, so light modules here (``bot.web.search``, which the
migrations environment reads) do not pull in aiohttp and the templates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bot.web.app import PAGE_SIZE, REGION_JOB_KEY, create_app, start_web

__all__ = ["PAGE_SIZE", "REGION_JOB_KEY", "create_app", "start_web"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from bot.web import app

        return getattr(app, name)
    raise AttributeError(f"module 'bot.web' has no attribute {name!r}")
