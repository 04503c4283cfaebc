"""The gallery's pages: explore, search, top, member pages, job pages and private job links."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from bot.signing import PURPOSE_JOB
from bot.web import listings, pages, queries
from bot.web.common import (
    PAGE_SIZE,
    PRIVATE_CACHE,
    SESSIONS_KEY,
    SETTINGS_KEY,
    link_claims,
    not_found,
    page_number,
    valid_id,
)
from bot.web.search import normalise_query


def _page_href(path: str, number: int, **params: str) -> str:
    query = {key: value for key, value in params.items() if value}
    if number > 1:
        query["page"] = str(number)
    return f"{path}?{urlencode(query)}" if query else path


def _listing(
    request: web.Request,
    page: listings.Page,
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
        raise not_found()
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
    number = page_number(request)
    query = normalise_query(request.query.get("q", ""))
    async with request.app[SESSIONS_KEY]() as session:
        page = await listings.entries_page(session, number, PAGE_SIZE, query=query)
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
    number = page_number(request)
    async with request.app[SESSIONS_KEY]() as session:
        page = await listings.entries_page(session, number, PAGE_SIZE, order=listings.Order.TOP)
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
    public_id = valid_id(request.match_info["public_id"])
    async with request.app[SESSIONS_KEY]() as session:
        found = await queries.member_by_public_id(session, public_id)
    if found is None:
        raise not_found()
    return found


def _member_tabs(view: queries.MemberView, current: str) -> list[tuple[str, str, bool]]:
    base = pages.member_url(view.public_id)
    return [
        ("Creations", base, current == "creations"),
        ("❤️ Favourites", f"{base}/favourites", current == "fav"),
    ]


async def member(request: web.Request) -> web.Response:
    """``/m/{public_id}``: one member's public families."""
    number = page_number(request)
    member_id, view = await _member(request)
    async with request.app[SESSIONS_KEY]() as session:
        page = await listings.entries_page(session, number, PAGE_SIZE, member_id=member_id)
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
    number = page_number(request)
    member_id, view = await _member(request)
    async with request.app[SESSIONS_KEY]() as session:
        page = await listings.favourites_page(session, member_id, number, PAGE_SIZE)
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

    def input_src(position: int) -> str:
        return f"{base}/in/{int(position)}.png" if private else f"/in/{job.job_id}/{int(position)}.png"

    og_image = og_base.rstrip("/") + img_src(hero.index, hero.ext) if hero is not None and og_base else ""
    return {
        "title": pages.shorten(job.prompt, 70) or "Untitled",
        "job": job,
        "hero": hero,
        "tiles": tiles,
        "params": pages.parameters(job.params, job.seed),
        "img_src": img_src,
        "thumb_src": thumb_src,
        "input_src": input_src,
        "private": private,
        "noindex": private,
        "og_image": og_image,
    }


async def job(request: web.Request) -> web.Response:
    """``/j/{job_id}``: a public job's page."""
    job_id = valid_id(request.match_info["job_id"])
    async with request.app[SESSIONS_KEY]() as session:
        view = await queries.job_view(session, job_id)
    if view is None:
        raise not_found()
    context = _job_context(view, base="", private=False, og_base=request.app[SETTINGS_KEY].public_url)
    return pages.render(request, "job.html", context)


async def private_job(request: web.Request) -> web.Response:
    """``/p/{token}``: a job's page for its owner's signed link, stealth jobs included."""
    claims = link_claims(request, PURPOSE_JOB)
    async with request.app[SESSIONS_KEY]() as session:
        view = await queries.owned_job_view(session, claims.job_id, claims.user_id)
    if view is None:
        raise not_found()
    base = f"/p/{pages.url_segment(request.match_info['token'])}"
    response = pages.render(request, "job.html", _job_context(view, base=base, private=True, og_base=None))
    response.headers["Cache-Control"] = PRIVATE_CACHE
    return response
