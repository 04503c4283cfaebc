"""The public web gallery: recent public jobs, member pages, job pages and image downloads."""

from __future__ import annotations

from bot.web.app import PAGE_SIZE, create_app, start_web

__all__ = ["PAGE_SIZE", "create_app", "start_web"]
