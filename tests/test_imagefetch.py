"""The bot's one way in for images: guarded URL fetching and Discord attachments.

A local aiohttp server on 127.0.0.1 plays the image host. Private addresses are only ever
reached through a resolver stub that maps made-up names to them, and every such test checks that
the refusal came before a connection: no traffic is ever sent to a private address.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import socket
import struct
import threading
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from PIL import Image

import bot.imagefetch
from bot.imagefetch import (
    INPUT_MAX_SIDE,
    FetchedImage,
    FetchLimits,
    ImageInputError,
    address_problem,
    fetch_image,
    fetch_images,
    fetch_references,
    image_label,
    read_attachment,
    validate_image,
)
from bot.inputs import fetch_inputs
from bot.prompt import parse_prompt
from bot.settings import BotSettings
from workers.schema import GenerationParams

pytestmark = pytest.mark.timeout(60)


def png_with_text(size: tuple[int, int] = (40, 30)) -> bytes:
    """A PNG carrying a tEXt chunk and an EXIF block, as phones and editors write them."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Description", "secret location")
    exif = Image.Exif()
    exif[0x010F] = "CameraMaker"
    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(out, "PNG", pnginfo=info, exif=exif.tobytes())
    return out.getvalue()


def jpeg_with_exif(size: tuple[int, int] = (48, 32), orientation: int = 6) -> bytes:
    """A JPEG with GPS-like EXIF text and an orientation tag (6: rotate 90° clockwise to view)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "CameraMaker"
    exif[0x9286] = "user comment with a home address"
    out = io.BytesIO()
    Image.new("RGB", size, (10, 120, 240)).save(out, "JPEG", exif=exif.tobytes(), quality=90)
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels: a decompression bomb's signature."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@dataclass
class Host:
    """A local image host and the paths it was asked for."""

    port: int
    hits: list[str] = field(default_factory=list)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def allow(self) -> list[str]:
        """An allow-list naming this server only (its port), not the rest of loopback."""
        return [f"127.0.0.1:{self.port}"]


async def _start(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert server is not None and server.sockets
    return runner, server.sockets[0].getsockname()[1]


def _app(host: Host) -> web.Application:
    routes = web.RouteTableDef()

    @web.middleware
    async def record(request: web.Request, handler):  # type: ignore[no-untyped-def]
        host.hits.append(request.path_qs)
        return await handler(request)

    @routes.get("/png")
    async def png(request: web.Request) -> web.Response:
        return web.Response(body=png_with_text(), content_type="image/png")

    @routes.get("/photo.jpg")
    async def jpeg(request: web.Request) -> web.Response:
        return web.Response(body=jpeg_with_exif(), content_type="image/jpeg")

    @routes.get("/text.png")
    async def text(request: web.Request) -> web.Response:
        # The extension and header both lie; only the bytes tell the truth.
        return web.Response(body=b"<html>not a picture</html>", content_type="image/png")

    @routes.get("/bomb.png")
    async def bomb(request: web.Request) -> web.Response:
        return web.Response(body=png_header_only(20_000, 20_000), content_type="image/png")

    @routes.get("/stream")
    async def stream(request: web.Request) -> web.StreamResponse:
        # No Content-Length: the size is only known by counting what arrives.
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(int(request.query.get("chunks", "64"))):
            await response.write(b"\0" * 16384)
        await response.write_eof()
        return response

    @routes.get("/declared")
    async def declared(request: web.Request) -> web.Response:
        return web.Response(body=b"\0" * (200 * 1024), content_type="image/png")

    @routes.get("/slow")
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(body=png_with_text(), content_type="image/png")

    @routes.get("/missing")
    async def missing(request: web.Request) -> web.Response:
        return web.Response(status=404, text="gone")

    @routes.get("/to")
    async def to(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["url"])

    @routes.get("/location")
    async def location(request: web.Request) -> web.Response:
        # The Location header exactly as given: web.HTTPFound would refuse the malformed ones.
        return web.Response(status=302, headers={"Location": request.query["to"]})

    @routes.get("/chain/{n}")
    async def chain(request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        raise web.HTTPFound("/png" if n == 0 else f"/chain/{n - 1}")

    app = web.Application(middlewares=[record])
    app.add_routes(routes)
    return app


@pytest.fixture
async def host() -> AsyncIterator[Host]:
    """The image host, on a free port of 127.0.0.1."""
    box = Host(port=0)
    runner, box.port = await _start(_app(box))
    try:
        yield box
    finally:
        await runner.cleanup()


@pytest.fixture
async def other_host() -> AsyncIterator[Host]:
    """A second loopback server, which only a successful redirect trick could reach."""
    box = Host(port=0)
    runner, box.port = await _start(_app(box))
    try:
        yield box
    finally:
        await runner.cleanup()


class StubResolver(AbstractResolver):
    """Maps made-up names to fixed addresses and records each lookup."""

    def __init__(self, names: dict[str, str]) -> None:
        self.names = names
        self.queries: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.queries.append(host)
        address = self.names[host]
        fam = socket.AF_INET6 if ":" in address else socket.AF_INET
        return [{"hostname": host, "host": address, "port": port, "family": fam, "proto": 0, "flags": 0}]

    async def close(self) -> None:
        return None


def assert_clean_png(image: FetchedImage) -> Image.Image:
    """The output is a PNG with no EXIF, text or ICC chunks; returns it opened."""
    assert image.data.startswith(b"\x89PNG\r\n\x1a\n")
    for chunk in (b"eXIf", b"tEXt", b"iTXt", b"zTXt", b"iCCP"):
        assert chunk not in image.data
    opened = Image.open(io.BytesIO(image.data))
    assert opened.format == "PNG"
    assert not opened.getexif()
    assert set(opened.info) <= {"dpi", "gamma"} and "Description" not in opened.info
    return opened


# --- acceptance -------------------------------------------------------------------------------


async def test_accepts_png_and_strips_its_text_and_exif(host: Host) -> None:
    image = await fetch_image(f"{host.origin}/png", allow_addresses=host.allow)
    opened = assert_clean_png(image)
    assert (image.width, image.height, image.source_format) == (40, 30, "PNG")
    assert opened.convert("RGB").getpixel((5, 5)) == (200, 30, 30)
    assert b"secret location" not in image.data


async def test_accepts_jpeg_applies_orientation_and_strips_exif(host: Host) -> None:
    image = await fetch_image(f"{host.origin}/photo.jpg", allow_addresses=host.allow)
    assert_clean_png(image)
    # Orientation 6 means the 48x32 sensor image is viewed rotated: 32 wide, 48 high.
    assert (image.width, image.height, image.source_format) == (32, 48, "JPEG")
    assert b"home address" not in image.data and b"CameraMaker" not in image.data


async def test_name_resolving_to_an_allowed_address_is_fetched(host: Host) -> None:
    resolver = StubResolver({"images.example.test": "127.0.0.1"})
    url = f"http://images.example.test:{host.port}/png"
    image = await fetch_image(url, allow_addresses=host.allow, resolver=resolver)
    assert image.width == 40
    assert resolver.queries == ["images.example.test"]


async def test_relative_redirects_within_the_limit_are_followed(host: Host) -> None:
    # /chain/2 -> /chain/1 -> /chain/0 -> /png: exactly three redirects.
    image = await fetch_image(f"{host.origin}/chain/2", allow_addresses=host.allow)
    assert image.width == 40
    assert host.hits == ["/chain/2", "/chain/1", "/chain/0", "/png"]


async def test_fetch_images_labels_in_order_and_reports_the_failing_one(host: Host) -> None:
    urls = [f"{host.origin}/png", f"{host.origin}/text.png"]
    with pytest.raises(ImageInputError) as info:
        await fetch_images(urls, allow_addresses=host.allow)
    assert info.value.image_label.startswith("image 2 (")
    ok = await fetch_images([f"{host.origin}/png", f"{host.origin}/photo.jpg"], allow_addresses=host.allow)
    assert [(i.width, i.height) for i in ok] == [(40, 30), (32, 48)]


async def test_fetch_references_groups_pictures_by_role(host: Host) -> None:
    params = GenerationParams(
        prompt="a fox",
        image_prompts=(f"{host.origin}/png", f"{host.origin}/photo.jpg"),
        style_refs=("1234567", f"{host.origin}/photo.jpg", "random"),
        character_refs=(f"{host.origin}/png",),
        omni_ref=f"{host.origin}/photo.jpg",
    )
    refs = await fetch_references(params, allow_addresses=host.allow)
    assert [(i.width, i.height) for i in refs.prompt_images] == [(40, 30), (32, 48)]
    assert [(i.width, i.height) for i in refs.style_images] == [(32, 48)]
    assert [(i.width, i.height) for i in refs.character_images] == [(40, 30)]
    assert [(i.width, i.height) for i in refs.omni_images] == [(32, 48)]
    assert refs.style_codes == ("1234567", "random")


async def test_weighted_style_references_are_fetched_without_their_weight(host: Host) -> None:
    # "--sref url::2" keeps its weight in the parsed reference; the download must not carry it.
    params = parse_prompt(f"a fox --sref {host.origin}/png::2 {host.origin}/photo.jpg::-0.5")
    assert params.style_refs == (f"{host.origin}/png::2", f"{host.origin}/photo.jpg::-0.5")
    refs = await fetch_references(params, allow_addresses=host.allow)
    assert [(i.width, i.height) for i in refs.style_images] == [(40, 30), (32, 48)]
    assert sorted(host.hits[-2:]) == ["/photo.jpg", "/png"]


async def test_fetch_references_names_the_parameter_of_a_bad_picture(host: Host) -> None:
    params = GenerationParams(
        prompt="a fox", character_refs=(f"{host.origin}/png", f"{host.origin}/text.png")
    )
    with pytest.raises(ImageInputError) as info:
        await fetch_references(params, allow_addresses=host.allow)
    assert str(info.value).startswith(
        f"--cref image 2 ({host.origin}/text.png) can't be used: it is not an image"
    )
    params = GenerationParams(prompt="a fox", omni_ref=f"{host.origin}/missing")
    with pytest.raises(ImageInputError, match=r"^--oref image \(http"):
        await fetch_references(params, allow_addresses=host.allow)


# --- addresses ----------------------------------------------------------------------------------


async def test_refuses_loopback_without_an_allow_list(host: Host) -> None:
    with pytest.raises(ImageInputError, match="the bot's own machine"):
        await fetch_image(f"{host.origin}/png")
    assert host.hits == []


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("10.1.2.3", "private network"),
        ("192.168.7.7", "private network"),
        ("172.16.0.9", "private network"),
        ("169.254.10.1", "link-local"),
        ("169.254.169.254", "cloud metadata"),
        ("fd00:ec2::254", "cloud metadata"),
        ("100.64.1.1", "carrier-grade NAT"),
        ("fd12:3456::1", "private network"),
        ("fec0::1", "site-local"),
        ("::ffff:10.0.0.1", "private network"),
        ("::ffff:127.0.0.1", "own machine"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("::1", "own machine"),
    ],
)
async def test_refuses_names_resolving_to_non_public_addresses(address: str, reason: str) -> None:
    resolver = StubResolver({"cdn.example.test": address})
    # A short connect budget: if the refusal came after a connect attempt this would time out
    # with another message instead.
    limits = FetchLimits(timeout_s=5)
    with pytest.raises(ImageInputError, match=reason):
        await fetch_image("http://cdn.example.test/cat.png", limits=limits, resolver=resolver)
    assert resolver.queries == ["cdn.example.test"]


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://10.0.0.1/cat.png", "private network"),
        ("http://[::1]:80/cat.png", "own machine"),
        ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
        ("http://[fd00:ec2::254]/latest/meta-data/", "cloud metadata"),
        ("http://[::ffff:192.168.0.1]/", "private network"),
    ],
)
async def test_refuses_literal_non_public_addresses_before_any_request(url: str, reason: str) -> None:
    resolver = StubResolver({})
    with pytest.raises(ImageInputError, match=reason):
        await fetch_image(url, resolver=resolver)
    assert resolver.queries == []


def test_public_addresses_pass() -> None:
    for text in ("8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "151.101.1.69"):
        assert address_problem(ipaddress.ip_address(text)) is None


async def test_allow_list_with_a_port_does_not_open_the_rest_of_loopback(
    host: Host, other_host: Host
) -> None:
    with pytest.raises(ImageInputError, match="own machine"):
        await fetch_image(f"{other_host.origin}/png", allow_addresses=host.allow)
    assert other_host.hits == []


async def test_redirect_to_another_loopback_port_is_refused(host: Host, other_host: Host) -> None:
    url = f"{host.origin}/to?url={other_host.origin}/png"
    with pytest.raises(ImageInputError, match="own machine"):
        await fetch_image(url, allow_addresses=host.allow)
    assert len(host.hits) == 1
    assert other_host.hits == []


async def test_redirect_to_a_private_literal_is_refused(host: Host) -> None:
    with pytest.raises(ImageInputError, match="private network"):
        await fetch_image(f"{host.origin}/to?url=http://10.0.0.1/png", allow_addresses=host.allow)


async def test_redirect_to_a_name_resolving_private_is_refused(host: Host) -> None:
    resolver = StubResolver({"images.example.test": "127.0.0.1", "intranet.example.test": "192.168.1.20"})
    url = f"http://images.example.test:{host.port}/to?url=http://intranet.example.test/png"
    with pytest.raises(ImageInputError, match="private network"):
        await fetch_image(url, allow_addresses=host.allow, resolver=resolver)
    assert resolver.queries == ["images.example.test", "intranet.example.test"]


async def test_too_many_redirects_are_refused(host: Host) -> None:
    with pytest.raises(ImageInputError, match="redirects more than 3 times"):
        await fetch_image(f"{host.origin}/chain/3", allow_addresses=host.allow)
    # The fourth redirect's target is never requested.
    assert host.hits == ["/chain/3", "/chain/2", "/chain/1", "/chain/0"]


@pytest.mark.parametrize("url", ["ftp://example.com/a.png", "file:///etc/passwd", "data:image/png;base64,AA"])
async def test_only_http_and_https_are_fetched(url: str) -> None:
    with pytest.raises(ImageInputError, match=r"only http:// and https://"):
        await fetch_image(url)


@pytest.mark.parametrize("url", ["http://a..b/cat.png", "http://" + "a" * 64 + ".example.com/cat.png"])
async def test_host_name_that_cannot_be_encoded_is_refused(url: str) -> None:
    # The prompt parser takes these as links; the IDNA codec refuses them when the name is
    # looked up, which must end as the member-facing error, not as an unhandled UnicodeError.
    with pytest.raises(ImageInputError, match="not a valid URL"):
        await fetch_image(url, limits=FetchLimits(timeout_s=5))


@pytest.mark.parametrize("location", ["http://[::1", "http://example.com:99999/", "http://a..b/cat.png"])
async def test_redirect_to_a_malformed_link_is_refused(host: Host, location: str) -> None:
    url = f"{host.origin}/location?to={quote(location, safe='')}"
    with pytest.raises(ImageInputError, match="redirected to a link that is not valid"):
        await fetch_image(url, limits=FetchLimits(timeout_s=5), allow_addresses=host.allow)
    assert len(host.hits) == 1


# --- size, time, content ---------------------------------------------------------------------


async def test_streamed_body_over_the_cap_is_aborted(host: Host) -> None:
    limits = FetchLimits(max_bytes=64 * 1024)
    with pytest.raises(ImageInputError, match="larger than 65536 bytes"):
        await fetch_image(f"{host.origin}/stream?chunks=64", limits=limits, allow_addresses=host.allow)


async def test_declared_length_over_the_cap_is_refused(host: Host) -> None:
    limits = FetchLimits(max_bytes=100 * 1024)
    with pytest.raises(ImageInputError, match="larger than"):
        await fetch_image(f"{host.origin}/declared", limits=limits, allow_addresses=host.allow)


async def test_default_cap_is_ten_mib(host: Host) -> None:
    # 11 MiB streamed with no Content-Length: refused by counting, not by a header.
    with pytest.raises(ImageInputError, match="larger than 10 MiB"):
        await fetch_image(f"{host.origin}/stream?chunks={11 * 64}", allow_addresses=host.allow)


async def test_slow_server_hits_the_total_timeout(host: Host) -> None:
    limits = FetchLimits(timeout_s=0.5)
    with pytest.raises(ImageInputError, match=r"longer than 0\.5 seconds"):
        await fetch_image(f"{host.origin}/slow", limits=limits, allow_addresses=host.allow)


async def test_http_error_status_is_reported(host: Host) -> None:
    with pytest.raises(ImageInputError, match="answered HTTP 404"):
        await fetch_image(f"{host.origin}/missing", allow_addresses=host.allow)


async def test_not_an_image_despite_name_and_header(host: Host) -> None:
    with pytest.raises(ImageInputError, match="not an image"):
        await fetch_image(f"{host.origin}/text.png", allow_addresses=host.allow)


async def test_decompression_bomb_is_refused_before_decoding(host: Host) -> None:
    with pytest.raises(ImageInputError, match="too many pixels"):
        await fetch_image(f"{host.origin}/bomb.png", allow_addresses=host.allow)


def test_pixel_cap_is_checked_from_the_header() -> None:
    # Just over the cap: Pillow itself would only warn here, and nothing is decoded.
    data = png_header_only(101, 100)
    with pytest.raises(ImageInputError, match=r"too many pixels \(101x100\)"):
        validate_image(data, "image 1", max_pixels=100 * 100)


def test_truncated_image_is_refused() -> None:
    data = png_with_text()[:-30]  # the header parses, the pixel data ends early
    with pytest.raises(ImageInputError, match="damaged or incomplete"):
        validate_image(data, "image 1")


def test_transparency_is_kept() -> None:
    out = io.BytesIO()
    Image.new("RGBA", (8, 8), (1, 2, 3, 0)).save(out, "PNG")
    image = validate_image(out.getvalue(), "image 1")
    assert Image.open(io.BytesIO(image.data)).mode == "RGBA"


def test_orientation_is_applied_despite_a_malformed_exif_block() -> None:
    # PlanarConfiguration (a SHORT tag) stored as text: Pillow reads it, but exif_transpose's
    # rewrite of the block it returns raised struct.error, which no caller catches.
    entries = [struct.pack("<HHII", 0x0112, 3, 1, 6), struct.pack("<HHI2s2x", 0x011C, 2, 2, b"x\0")]
    ifd = struct.pack("<H", len(entries)) + b"".join(entries) + struct.pack("<I", 0)
    out = io.BytesIO()
    exif = b"Exif\0\0II*\0" + struct.pack("<I", 8) + ifd
    Image.new("RGB", (48, 32), (10, 120, 240)).save(out, "JPEG", exif=exif)
    image = validate_image(out.getvalue(), "image 1")
    assert_clean_png(image)
    assert (image.width, image.height) == (32, 48)


def png_grey16(value: int, transparent: int | None = None) -> bytes:
    """A 4x4 16-bit greyscale PNG of one ``value``, with a tRNS grey when ``transparent`` is set."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = (b"\0" + struct.pack(">H", value) * 4) * 4
    trns = b"" if transparent is None else chunk(b"tRNS", struct.pack(">H", transparent))
    ihdr = struct.pack(">IIBBBBB", 4, 4, 16, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + trns
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    # Pillow opens these as I;16; converting straight to RGB clips, so mid-grey came out white.
    image = validate_image(png_grey16(0x8000), "image 1")
    assert Image.open(io.BytesIO(image.data)).getpixel((0, 0)) == (128, 128, 128)
    dark = validate_image(png_grey16(0x0100), "image 1")
    assert Image.open(io.BytesIO(dark.data)).getpixel((0, 0)) == (1, 1, 1)


def test_sixteen_bit_grey_keeps_its_transparent_grey() -> None:
    clear = Image.open(io.BytesIO(validate_image(png_grey16(0x8000, 0x8000), "image 1").data))
    assert clear.mode == "RGBA" and clear.getpixel((0, 0)) == (128, 128, 128, 0)
    solid = Image.open(io.BytesIO(validate_image(png_grey16(0x8000, 5), "image 1").data))
    assert solid.getpixel((0, 0))[3] == 255


async def test_decoding_runs_a_few_images_at_a_time(host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    # A 64 MP picture needs about a gigabyte while it is converted and a prompt may carry 31
    # links: decoding them all at once would let one prompt exhaust the bot's memory.
    real = bot.imagefetch.validate_image
    lock = threading.Lock()
    running = peak = 0

    def counting(data: bytes, label: str, *, max_pixels: int | None = None) -> FetchedImage:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        try:
            time.sleep(0.05)
            return real(data, label, max_pixels=max_pixels)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(bot.imagefetch, "validate_image", counting)
    images = await fetch_images([f"{host.origin}/png"] * 8, allow_addresses=host.allow)
    assert len(images) == 8
    assert peak <= bot.imagefetch.DECODE_THREADS


# --- messages --------------------------------------------------------------------------------


def test_error_text_names_the_image_and_the_reason() -> None:
    label = image_label(2, "https://example.com/" + "a" * 100 + ".png")
    assert label.startswith("image 2 (https://example.com/") and label.endswith("…)")
    error = ImageInputError(label, "it is larger than 10 MiB")
    assert str(error).startswith("Image 2 (https://example.com/")
    assert str(error).endswith("can't be used: it is larger than 10 MiB.")


def test_limits_come_from_settings() -> None:
    settings = BotSettings(image_fetch_max_bytes=2048, image_fetch_timeout_s=3, image_fetch_max_redirects=1)
    assert FetchLimits.from_settings(settings) == FetchLimits(max_bytes=2048, timeout_s=3, max_redirects=1)


# --- Discord attachments ---------------------------------------------------------------------


class FakeAttachment:
    """The part of ``discord.Attachment`` the reader uses, counting downloads."""

    def __init__(
        self, data: bytes, *, filename: str, content_type: str | None, size: int | None = None
    ) -> None:
        self._data = data
        self.filename = filename
        self.content_type = content_type
        self.size = len(data) if size is None else size
        self.reads = 0

    async def read(self, *, use_cached: bool = False) -> bytes:
        self.reads += 1
        return self._data


async def test_attachment_is_validated_and_cleaned() -> None:
    attachment = FakeAttachment(jpeg_with_exif(), filename="photo.jpg", content_type="image/jpeg")
    image = await read_attachment(attachment, 1)  # type: ignore[arg-type]
    assert_clean_png(image)
    assert (image.width, image.height) == (32, 48)


async def test_oversize_attachment_is_refused_before_download() -> None:
    attachment = FakeAttachment(b"", filename="huge.png", content_type="image/png", size=11 * 1024 * 1024)
    with pytest.raises(
        ImageInputError, match=r"Image 1 \(huge.png\) can't be used: it is larger than 10 MiB"
    ):
        await read_attachment(attachment, 1)  # type: ignore[arg-type]
    assert attachment.reads == 0


async def test_non_image_attachment_is_refused_before_download() -> None:
    attachment = FakeAttachment(b"%PDF-1.7", filename="doc.pdf", content_type="application/pdf")
    with pytest.raises(ImageInputError, match=r"Image 3 \(doc.pdf\).*application/pdf"):
        await read_attachment(attachment, 3)  # type: ignore[arg-type]
    assert attachment.reads == 0


async def test_attachment_declared_as_image_is_still_sniffed() -> None:
    attachment = FakeAttachment(b"GIF89a but not really", filename="x.gif", content_type="image/gif")
    with pytest.raises(ImageInputError, match="not an image"):
        await read_attachment(attachment, 1)  # type: ignore[arg-type]
    assert attachment.reads == 1


class BrokenAttachment(FakeAttachment):
    """An attachment whose download from Discord's CDN breaks off."""

    async def read(self, *, use_cached: bool = False) -> bytes:
        self.reads += 1
        raise aiohttp.ClientPayloadError("Response payload is not completed")


async def test_attachment_download_failure_is_reported() -> None:
    attachment = BrokenAttachment(b"", filename="cat.png", content_type="image/png", size=1000)
    with pytest.raises(ImageInputError, match=r"Image 2 \(cat.png\) can't be used: Discord did not send it"):
        await read_attachment(attachment, 2)  # type: ignore[arg-type]


async def test_link_images_are_numbered_after_the_attachment(host: Host) -> None:
    # The attachment is image 1 and is stored first; workers number the pictures the same way.
    attachment = FakeAttachment(png_with_text(), filename="photo.png", content_type="image/png")
    params = GenerationParams(prompt="a fox", image_prompts=(f"{host.origin}/png", f"{host.origin}/text.png"))
    with pytest.raises(ImageInputError) as info:
        await fetch_inputs(params, attachment, FetchLimits(), host.allow)  # type: ignore[arg-type]
    assert info.value.image_label.startswith(f"image 3 ({host.origin}/text.png")
    found = await fetch_inputs(
        params.model_copy(update={"image_prompts": (f"{host.origin}/photo.jpg",)}),
        attachment,  # type: ignore[arg-type]
        FetchLimits(),
        host.allow,
    )
    assert [(i.width, i.height) for i in found["image"]] == [(40, 30), (32, 48)]


def test_large_pictures_are_kept_at_the_input_size_with_their_shape() -> None:
    # Inputs travel inside the job's message: a 12 MP photo is scaled to what any engine uses.
    buffer = io.BytesIO()
    Image.new("RGB", (4000, 3000), (40, 90, 160)).save(buffer, "JPEG")
    image = validate_image(buffer.getvalue(), "image 1")
    assert (image.width, image.height) == (INPUT_MAX_SIDE, INPUT_MAX_SIDE * 3 // 4)
    assert Image.open(io.BytesIO(image.data)).size == (image.width, image.height)
    assert image.source_format == "JPEG"
