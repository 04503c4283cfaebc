"""HTML for the gallery: plain f-strings, every outside value through ``esc``.

Prompts and display names are hostile input. The rule here is simple and checkable: any value
that did not come from a literal in this file is passed through ``esc`` (text and attributes) or
``url_segment`` (paths) before it is put into markup. Pages use no script at all and one inline
stylesheet that the Content-Security-Policy allows by hash, so nothing loads from elsewhere.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
from datetime import datetime
from typing import Any
from urllib.parse import quote

from bot.web.queries import ImageView, JobView, MemberView, Page, Tile

SITE_NAME = "Mirage"

CSS = """
:root{--bg:#0a0a0d;--panel:#131318;--panel2:#1a1a21;--line:#26262f;--text:#ececf1;
--muted:#9494a3;--accent:#8ab4ff;--radius:12px;color-scheme:dark}
*{box-sizing:border-box}
html{background:var(--bg)}
body{margin:0;color:var(--text);font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,
"Helvetica Neue",Arial,sans-serif;-webkit-font-smoothing:antialiased}
a{color:inherit;text-decoration:none}
a:focus-visible{outline:2px solid var(--accent);outline-offset:2px}
.top{position:sticky;top:0;z-index:5;display:flex;align-items:center;gap:24px;padding:14px 24px;
background:rgba(10,10,13,.86);backdrop-filter:blur(10px);border-bottom:1px solid var(--line)}
.brand{display:flex;align-items:center;gap:10px;font-weight:700;font-size:18px;letter-spacing:.02em}
.logo{width:26px;height:26px;border-radius:8px;
background:conic-gradient(from 200deg,#ff7ab6,#8ab4ff,#7affd1,#ffd27a,#ff7ab6)}
.top nav a{color:var(--muted);font-weight:500}
.top nav a:hover,.top nav a[aria-current]{color:var(--text)}
main{max-width:1600px;margin:0 auto;padding:24px}
.head{display:flex;align-items:baseline;justify-content:space-between;gap:16px;flex-wrap:wrap;
margin:4px 0 20px}
h1{font-size:28px;line-height:1.2;margin:0;font-weight:700;letter-spacing:-.01em}
.sub{color:var(--muted);margin:4px 0 0}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,220px),1fr));gap:10px}
.tile{position:relative;display:block;aspect-ratio:1/1;overflow:hidden;border-radius:var(--radius);
background:var(--panel2)}
.tile img{display:block;width:100%;height:100%;object-fit:cover;transition:transform .35s ease}
.tile:hover img,.tile:focus-visible img{transform:scale(1.045)}
.cap{position:absolute;left:0;right:0;bottom:0;padding:40px 12px 10px;font-size:13px;line-height:1.4;
background:linear-gradient(to top,rgba(0,0,0,.9),rgba(0,0,0,.55) 60%,transparent);opacity:0;
transition:opacity .2s ease}
.tile:hover .cap,.tile:focus-visible .cap{opacity:1}
.cap .p{display:-webkit-box;-webkit-line-clamp:3;-webkit-box-orient:vertical;overflow:hidden;
overflow-wrap:anywhere}
.cap .by{display:block;margin-top:4px;color:var(--muted);font-size:12px}
@media (hover:none) and (pointer:coarse){.cap{opacity:1;padding-top:28px}.cap .p{-webkit-line-clamp:2}}
.empty{padding:80px 16px;text-align:center;color:var(--muted);border:1px dashed var(--line);
border-radius:var(--radius)}
.pager{display:flex;justify-content:center;align-items:center;gap:16px;margin:28px 0 8px;
color:var(--muted)}
.btn{display:inline-flex;align-items:center;gap:6px;padding:8px 14px;border-radius:999px;
background:var(--panel2);border:1px solid var(--line);color:var(--text);font-size:14px;
font-weight:500;white-space:nowrap}
.btn:hover{border-color:#3a3a46;background:#22222b}
.job{display:grid;grid-template-columns:minmax(0,1.7fr) minmax(300px,1fr);gap:28px;align-items:start}
@media (max-width:960px){.job{grid-template-columns:minmax(0,1fr)}}
.hero{margin:0}
.hero img{display:block;width:100%;height:auto;border-radius:var(--radius);background:var(--panel2)}
.tiles{display:grid;grid-template-columns:repeat(4,minmax(0,1fr));gap:8px;margin-top:10px}
.tiles .tile{aspect-ratio:1/1}
.tiles .n{position:absolute;top:6px;left:6px;padding:1px 7px;border-radius:999px;font-size:12px;
background:rgba(0,0,0,.65)}
.panel{background:var(--panel);border:1px solid var(--line);border-radius:var(--radius);padding:18px}
.panel+.panel{margin-top:14px}
.label{margin:0 0 6px;color:var(--muted);font-size:12px;font-weight:600;letter-spacing:.08em;
text-transform:uppercase}
.prompt{margin:0;font-size:16px;line-height:1.55;white-space:pre-wrap;overflow-wrap:anywhere}
.neg{margin:10px 0 0;color:var(--muted);white-space:pre-wrap;overflow-wrap:anywhere}
.who{display:flex;align-items:center;gap:10px;margin-top:14px;color:var(--muted)}
.who a{color:var(--text);font-weight:600}
.who a:hover{color:var(--accent)}
.avatar{display:inline-grid;place-items:center;width:28px;height:28px;border-radius:50%;
background:var(--panel2);border:1px solid var(--line);font-size:13px;font-weight:700;color:var(--text)}
dl.params{display:grid;grid-template-columns:auto minmax(0,1fr);gap:7px 16px;margin:0}
dl.params dt{color:var(--muted)}
dl.params dd{margin:0;overflow-wrap:anywhere;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:2px 10px;border-radius:999px;background:var(--panel2);
border:1px solid var(--line);font-size:12px;font-weight:600;text-transform:capitalize}
.parent{display:flex;gap:12px;align-items:center}
.parent img{width:56px;height:56px;object-fit:cover;border-radius:8px;flex:none}
.parent span{display:-webkit-box;-webkit-line-clamp:2;-webkit-box-orient:vertical;overflow:hidden;
overflow-wrap:anywhere}
.parent:hover span{color:var(--accent)}
.downloads{display:flex;flex-wrap:wrap;gap:8px}
.err{padding:90px 16px;text-align:center}
.err .code{font-size:64px;font-weight:800;color:#30303b;line-height:1}
footer{max-width:1600px;margin:0 auto;padding:24px;color:#5c5c6a;font-size:13px}
@media (max-width:600px){main{padding:14px}.top{padding:12px 14px}h1{font-size:22px}
.grid{gap:6px;grid-template-columns:repeat(2,minmax(0,1fr))}}
""".strip()

CSS_HASH = base64.b64encode(hashlib.sha256(CSS.encode()).digest()).decode()

# No scripts, no frames, no forms, no outside hosts: images and the stylesheet above only.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; "
    "img-src 'self'; "
    f"style-src 'sha256-{CSS_HASH}'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

FAVICON_SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32">'
    '<defs><linearGradient id="g" x1="0" y1="0" x2="1" y2="1">'
    '<stop offset="0" stop-color="#ff7ab6"/><stop offset=".5" stop-color="#8ab4ff"/>'
    '<stop offset="1" stop-color="#7affd1"/></linearGradient></defs>'
    '<rect width="32" height="32" rx="9" fill="url(#g)"/></svg>'
)

# Params that are shown elsewhere on the page, or that would reveal something hidden (the
# parent's id) or are blobs (an input image), never go into the parameter list.
HIDDEN_PARAMS = frozenset(
    {
        "prompt",
        "negative_prompt",
        "seed",
        "engine",
        "visibility",
        "input_image",
        "image",
        "mask",
        "parent",
        "parent_id",
        "parent_index",
        "job_id",
        "interaction_token",
    }
)
MAX_PARAM_CHARS = 200


def esc(value: object) -> str:
    """HTML-escape any value for text or a quoted attribute."""
    return html.escape(str(value), quote=True)


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


def _shorten(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _name(display_name: str) -> str:
    return display_name.strip() or "Anonymous"


def _when(moment: datetime | None) -> str:
    if moment is None:
        return ""
    return f'<time datetime="{esc(moment.isoformat())}">{esc(moment.strftime("%Y-%m-%d %H:%M"))} UTC</time>'


def layout(title: str, body: str, *, nav: str = "", head: str = "") -> str:
    """The page shell: header, main content and footer around ``body`` (already safe HTML)."""
    explore_current = ' aria-current="page"' if nav == "explore" else ""
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{esc(title)} · {SITE_NAME}</title>
<link rel="icon" href="/favicon.svg" type="image/svg+xml">
{head}<style>{CSS}</style>
</head>
<body>
<header class="top">
<a class="brand" href="/"><span class="logo" aria-hidden="true"></span>{SITE_NAME}</a>
<nav><a href="/"{explore_current}>Explore</a></nav>
</header>
<main>
{body}
</main>
<footer>Made with {SITE_NAME}. Only public creations are shown here.</footer>
</body>
</html>
"""


def _tile(tile: Tile, *, show_member: bool) -> str:
    prompt = _shorten(tile.prompt, 300) or "Untitled"
    by = f'<span class="by">{esc(_name(tile.member_name))}</span>' if show_member else ""
    return (
        f'<a class="tile" href="{job_url(tile.job_id)}" data-job="{esc(tile.job_id)}">'
        f'<img src="{thumb_url(tile.job_id, tile.cover_index)}" alt="{esc(prompt)}" '
        f'loading="lazy" decoding="async" width="384" height="384">'
        f'<span class="cap"><span class="p">{esc(prompt)}</span>{by}</span></a>'
    )


def _pager(page: Page, base_path: str) -> str:
    if page.number == 1 and not page.has_next:
        return ""
    parts = []
    if page.number > 1:
        prev_href = base_path if page.number == 2 else f"{base_path}?page={page.number - 1}"
        parts.append(f'<a class="btn" rel="prev" href="{esc(prev_href)}">← Newer</a>')
    parts.append(f"<span>Page {page.number}</span>")
    if page.has_next:
        parts.append(f'<a class="btn" rel="next" href="{esc(base_path)}?page={page.number + 1}">Older →</a>')
    return f'<nav class="pager" aria-label="Pages">{"".join(parts)}</nav>'


def _grid(page: Page, base_path: str, *, show_member: bool, empty: str) -> str:
    if not page.tiles:
        return f'<p class="empty">{esc(empty)}</p>'
    tiles = "\n".join(_tile(t, show_member=show_member) for t in page.tiles)
    return f'<section class="grid">\n{tiles}\n</section>\n{_pager(page, base_path)}'


def feed_page(page: Page) -> str:
    """The home page: recent public creations."""
    title = "Explore" if page.number == 1 else f"Explore · page {page.number}"
    body = (
        '<div class="head"><div><h1>Explore</h1>'
        '<p class="sub">Recent public creations from the community</p></div></div>\n'
        + _grid(page, "/", show_member=True, empty="Nothing here yet. Public creations will appear here.")
    )
    return layout(title, body, nav="explore")


def member_page(member: MemberView, page: Page) -> str:
    """A member's public creations."""
    name = _name(member.display_name)
    body = (
        f'<div class="head"><div><h1>{esc(name)}</h1>'
        f'<p class="sub">Public creations</p></div></div>\n'
        + _grid(page, member_url(member.public_id), show_member=False, empty="No public creations yet.")
    )
    title = name if page.number == 1 else f"{name} · page {page.number}"
    return layout(title, body)


def _param_value(key: str, value: Any) -> str | None:
    if value is None or value == "" or value == [] or value == {}:
        return None
    if key == "aspect" and isinstance(value, list | tuple) and len(value) == 2:
        return f"{value[0]}:{value[1]}"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float | str):
        text = str(value)
    else:
        text = json.dumps(value, ensure_ascii=False, default=str)
    # Long values are blobs or free text that the page has no room for.
    return None if len(text) > MAX_PARAM_CHARS else text


def _params(job: JobView) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = [
        ("Kind", job.kind),
        ("Engine", job.engine),
        ("Seed", str(job.seed)),
    ]
    for key, value in job.params.items():
        if not isinstance(key, str) or key in HIDDEN_PARAMS or key.startswith("_"):
            continue
        text = _param_value(key, value)
        if text is not None:
            rows.append((key.replace("_", " ").capitalize(), text))
    return rows


def job_page(job: JobView, public_url: str) -> str:
    """A job: its images, prompt, parameters, creator, parent (if public) and downloads."""
    title = _shorten(job.prompt, 70) or "Untitled"
    hero_image: ImageView | None = job.images[0] if job.images else None
    tiles = [image for image in job.images if image.index > 0]
    # A grid's page leads with the grid (index 0) and lists its tiles underneath.
    if hero_image is not None:
        hero = (
            f'<figure class="hero"><a href="{image_url(job.job_id, hero_image.index, hero_image.ext)}">'
            f'<img src="{image_url(job.job_id, hero_image.index, hero_image.ext)}" '
            f'alt="{esc(_shorten(job.prompt, 300))}" width="{int(hero_image.width)}" '
            f'height="{int(hero_image.height)}"></a></figure>'
        )
    else:
        hero = '<p class="empty">No images.</p>'
    tile_html = ""
    if hero_image is not None and hero_image.index == 0 and tiles:
        tile_html = (
            '<div class="tiles">'
            + "".join(
                f'<a class="tile" href="{image_url(job.job_id, t.index, t.ext)}" '
                f'aria-label="Image {int(t.index)}">'
                f'<img src="{thumb_url(job.job_id, t.index)}" alt="" loading="lazy" width="384" height="384">'
                f'<span class="n">{int(t.index)}</span></a>'
                for t in tiles
            )
            + "</div>"
        )

    negative = job.params.get("negative_prompt")
    negative_html = (
        f'<p class="neg"><strong>Negative:</strong> {esc(negative)}</p>'
        if isinstance(negative, str) and negative.strip()
        else ""
    )
    name = _name(job.member.display_name)
    who = (
        f'<div class="who"><span class="avatar" aria-hidden="true">{esc(name[:1].upper())}</span>'
        f'<span>by <a href="{member_url(job.member.public_id)}">{esc(name)}</a> · '
        f"{_when(job.created_at)}</span></div>"
    )

    params = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in _params(job))
    if hero_image is not None:
        params += f"<dt>Size</dt><dd>{int(hero_image.width)} × {int(hero_image.height)}</dd>"

    parent_html = ""
    if job.parent is not None:
        thumb = (
            f'<img src="{thumb_url(job.parent.job_id, job.parent.cover_index)}" alt="">'
            if job.parent.cover_index is not None
            else ""
        )
        from_image = f" (image {int(job.parent_index)})" if job.parent_index else ""
        parent_html = (
            f'<section class="panel"><p class="label">Made from{esc(from_image)}</p>'
            f'<a class="parent" href="{job_url(job.parent.job_id)}" data-parent="{esc(job.parent.job_id)}">'
            f"{thumb}<span>{esc(_shorten(job.parent.prompt, 200) or 'Untitled')}</span></a></section>"
        )

    labels = {0: "Grid" if tiles else "Image"}
    downloads = "".join(
        f'<a class="btn" href="{image_url(job.job_id, i.index, i.ext)}" '
        f'download="mirage-{esc(job.job_id)}-{int(i.index)}.{esc(i.ext)}">'
        f"↓ {esc(labels.get(i.index, f'Image {i.index}'))}</a>"
        for i in job.images
    )

    body = f"""<div class="job">
<div>{hero}{tile_html}</div>
<aside>
<section class="panel"><p class="label">Prompt</p>
<p class="prompt">{esc(job.prompt)}</p>{negative_html}{who}</section>
{parent_html}
<section class="panel"><p class="label">Parameters</p><dl class="params">{params}</dl></section>
<section class="panel"><p class="label">Download</p><div class="downloads">{downloads}</div></section>
</aside>
</div>"""

    head = ""
    if hero_image is not None:
        absolute = public_url.rstrip("/") + image_url(job.job_id, hero_image.index, hero_image.ext)
        head = (
            f'<meta property="og:title" content="{esc(title)}">\n'
            f'<meta property="og:type" content="website">\n'
            f'<meta property="og:image" content="{esc(absolute)}">\n'
            f'<meta name="description" content="{esc(_shorten(job.prompt, 200))}">\n'
        )
    return layout(title, body, head=head)


def error_page(status: int, message: str) -> str:
    """A plain error page; the same text for every "not found", whatever the reason."""
    body = (
        f'<div class="err"><div class="code">{int(status)}</div>'
        f'<h1>{esc(message)}</h1><p class="sub"><a class="btn" href="/">Back to Explore</a></p></div>'
    )
    return layout(message, body)
