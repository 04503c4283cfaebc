"""The one safe way in for images on the bot side: Discord attachments and URLs typed in prompts.

Every image a member hands the bot (an ``/describe`` attachment, a ``/blend`` picture, an image
URL at the start of a prompt, ``--sref`` / ``--cref`` / ``--oref`` URLs) comes through here and
leaves as a freshly encoded PNG with no metadata, or as one :class:`ImageInputError` whose text
can be shown to the member as it is.

URLs are fetched by a guarded client, because a URL typed by a member makes the bot itself send a
request (server-side request forgery): only http(s), only public internet addresses, checked on
the address actually connected to (after DNS, so a public-looking name pointing at 10.0.0.1 is
refused) and again on every redirect hop, with a byte cap, a time cap and no proxy from the
environment. The type is sniffed by Pillow from the bytes, never trusted from the extension or
the ``Content-Type`` header, and decompression bombs are refused before any pixel is decoded.
"""

from __future__ import annotations

import asyncio
import functools
import io
import ipaddress
import logging
import socket
import warnings
from collections.abc import Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from PIL import ExifTags, Image
from yarl import URL

from bot.prompt import split_reference

if TYPE_CHECKING:
    import discord

    from bot.settings import BotSettings
    from workers.schema import GenerationParams

log = logging.getLogger(__name__)

MIB = 1024 * 1024
DEFAULT_MAX_BYTES = 10 * MIB
DEFAULT_TIMEOUT_S = 20.0
DEFAULT_MAX_REDIRECTS = 3
LABEL_URL_CHARS = 60  # long URLs are shortened in messages so the sentence stays readable
CHUNK_BYTES = 64 * 1024
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
REDIRECTED_TO_INVALID = "the server redirected to a link that is not valid"

# Pillow format names accepted as image input. Animated GIF/WebP give their first frame.
ACCEPTED_FORMATS = frozenset({"PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP"})
# EXIF orientation -> the transpose that shows the picture upright (as ImageOps.exif_transpose).
ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# The longest side an input picture is kept at. Every use stays below it (SDXL works at its
# ~1 MP buckets, the IP-Adapter at 224 px, OpenAI edits at 1536 px at most), and inputs travel
# to the workers inside the job's message: five 12 MP photos as PNG would make one of 200 MB.
INPUT_MAX_SIDE = 1536
# Modes Pillow gives 16-bit greyscale PNGs: their values run to 65535, not 255.
WIDE_GREY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})

# Decoding is the memory-hungry step (a 64 MP picture takes about a gigabyte while it is
# converted) and one prompt may carry 31 links, so at most this many pictures are decoded at a
# time, bot-wide, on threads of their own: waiting here starves no DNS lookup.
DECODE_THREADS = 2
_decoder = ThreadPoolExecutor(max_workers=DECODE_THREADS, thread_name_prefix="image-decode")

# Cloud instance-metadata endpoints (AWS, GCP, Azure, OpenStack; AWS's IPv6 one). They are also
# link-local or ULA, but are named separately so the log says what was attempted.
METADATA_ADDRESSES = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)
CGNAT = ipaddress.ip_network("100.64.0.0/10")
NAT64 = ipaddress.ip_network("64:ff9b::/96")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class ImageInputError(Exception):
    """An image a member gave could not be used; ``str()`` is a member-facing sentence.

    ``image_label`` names the image the way the member knows it ("image 2 (https://…)"),
    ``reason`` says why in plain words ("it is larger than 10 MiB").
    """

    def __init__(self, image_label: str, reason: str) -> None:
        self.image_label = image_label
        self.reason = reason
        super().__init__(f"{image_label[:1].upper()}{image_label[1:]} can't be used: {reason}.")


@dataclass(frozen=True)
class FetchedImage:
    """A validated input image: PNG bytes without metadata, its size and the format it came in."""

    data: bytes
    width: int
    height: int
    source_format: str


@dataclass(frozen=True)
class FetchLimits:
    """Caps for one image: bytes downloaded, seconds for the whole fetch, redirects, pixels."""

    max_bytes: int = DEFAULT_MAX_BYTES
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_redirects: int = DEFAULT_MAX_REDIRECTS
    max_pixels: int | None = None  # None: Pillow's Image.MAX_IMAGE_PIXELS at call time

    @classmethod
    def from_settings(cls, settings: BotSettings) -> FetchLimits:
        """The limits an operator configured (``IMAGE_FETCH_*``)."""
        return cls(
            max_bytes=settings.image_fetch_max_bytes,
            timeout_s=settings.image_fetch_timeout_s,
            max_redirects=settings.image_fetch_max_redirects,
        )


def image_label(index: int | None, source: str) -> str:
    """How messages name an image: ``image 2 (https://example.com/cat.png)``, 1-based.

    ``index`` None gives ``image (…)``, for a parameter that takes one picture.
    """
    if len(source) > LABEL_URL_CHARS:
        source = source[: LABEL_URL_CHARS - 1] + "…"
    name = "image" if index is None else f"image {index}"
    return f"{name} ({source})" if source else name


def _size_text(limit: int) -> str:
    return f"{limit // MIB} MiB" if limit % MIB == 0 else f"{limit} bytes"


# --- addresses ------------------------------------------------------------------------------


def address_problem(address: IPAddress) -> str | None:
    """Why the bot must not connect to ``address`` (a member-facing phrase), or None if it is public."""
    if isinstance(address, ipaddress.IPv6Address):
        # An IPv6 form that carries an IPv4 address is judged by that IPv4 address.
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is None and address.teredo is not None:
            embedded = address.teredo[1]
        if embedded is not None:
            return address_problem(embedded)
    if address in METADATA_ADDRESSES:
        return "it points to a cloud metadata address"
    if address.is_loopback:
        return "it points to the bot's own machine"
    if address.is_unspecified:
        return "it points to an unspecified address"
    if address.is_link_local:
        return "it points to a link-local address"
    if address.is_multicast:
        return "it points to a multicast address"
    if isinstance(address, ipaddress.IPv4Address) and address in CGNAT:
        return "it points to a carrier-grade NAT address"
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:
        return "it points to a site-local address"
    if address.is_reserved:
        return "it points to a reserved address"
    if address.is_private or not address.is_global:
        # Python counts documentation, benchmarking and similar special ranges as private too.
        return "it points to a private network address"
    return None


class BlockedAddressError(OSError):
    """A host resolved to an address the bot refuses to connect to."""

    def __init__(self, host: str, address: str, reason: str) -> None:
        super().__init__(f"{host} -> {address}: {reason}")
        self.host = host
        self.address = address
        self.reason = reason


def _parse_allowed(entries: Iterable[str]) -> frozenset[tuple[IPAddress, int | None]]:
    """``"127.0.0.1"``, ``"127.0.0.1:8080"``, ``"::1"`` or ``"[::1]:8080"`` to (address, port)."""
    allowed: set[tuple[IPAddress, int | None]] = set()
    for entry in entries:
        text = entry.strip()
        port: int | None = None
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            port = int(rest[1:]) if rest.startswith(":") else None
        elif text.count(":") == 1:
            host, _, port_text = text.partition(":")
            port = int(port_text)
        else:
            host = text
        allowed.add((ipaddress.ip_address(host), port))
    return frozenset(allowed)


class AddressPolicy:
    """Which addresses may be connected to: public ones, plus an explicit allow-list.

    The allow-list exists for tests, whose servers listen on 127.0.0.1; an entry may name a port
    so that a test server is reachable while the rest of loopback stays refused.
    """

    def __init__(self, allow_addresses: Iterable[str] = ()) -> None:
        self._allowed = _parse_allowed(allow_addresses)

    def problem(self, address: IPAddress, port: int) -> str | None:
        """Why ``address:port`` is refused, or None when the bot may connect."""
        if (address, None) in self._allowed or (address, port) in self._allowed:
            return None
        return address_problem(address)


class GuardedResolver(AbstractResolver):
    """Resolves through ``inner`` and refuses the answer if any address is not allowed.

    aiohttp calls the resolver for every new connection (the connector's DNS cache is off), so
    the check is on the addresses actually connected to, not on a lookup done earlier. One bad
    address refuses the whole answer: a name that mixes public and private addresses is a trick.
    """

    def __init__(self, policy: AddressPolicy, inner: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._inner = inner if inner is not None else aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """Resolve ``host`` and check every address it gave."""
        results = await self._inner.resolve(host, port, family)
        for result in results:
            address = ipaddress.ip_address(result["host"].split("%", 1)[0])
            reason = self._policy.problem(address, port)
            if reason is not None:
                raise BlockedAddressError(host, str(address), reason)
        return results

    async def close(self) -> None:
        """Close the inner resolver."""
        await self._inner.close()


def _blocked_cause(exc: BaseException) -> BlockedAddressError | None:
    """The BlockedAddressError behind an aiohttp connection error, if that is what it was."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, BlockedAddressError):
            return current
        seen.add(id(current))
        nested = getattr(current, "os_error", None)
        current = nested if isinstance(nested, BaseException) else (current.__cause__ or current.__context__)
    return None


# --- validation -----------------------------------------------------------------------------


def _narrow_grey(img: Image.Image) -> Image.Image:
    """A 16-bit greyscale picture as 8-bit ``L``, or ``LA`` when its tRNS grey marks transparency.

    ``convert("RGB")`` clips every value above 255 to white instead of scaling it.
    """
    wide = img.convert("I")
    grey = wide.point([value >> 8 for value in range(65536)], "L")
    key = img.info.get("transparency")
    if not isinstance(key, int):
        return grey
    alpha = wide.point([0 if value == key else 255 for value in range(65536)], "L")
    return Image.merge("LA", (grey, alpha))


def validate_image(data: bytes, label: str, *, max_pixels: int | None = None) -> FetchedImage:
    """Check that ``data`` is a real, reasonably sized picture and re-encode it as a bare PNG.

    The format comes from Pillow's sniffing of the bytes. The pixel count is checked from the
    header before any decoding, so a small file that would expand to gigabytes is refused
    cheaply. An EXIF orientation is applied to the pixels; everything else (EXIF, XMP, ICC, text
    chunks) is dropped by building a new image from the pixels alone. A picture larger than
    ``INPUT_MAX_SIDE`` on a side is scaled down to it, keeping its shape.
    """
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if not data:
        raise ImageInputError(label, "it is empty")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; here it is an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageInputError(label, "it has too many pixels") from None
    except (OSError, SyntaxError, ValueError):
        raise ImageInputError(label, "it is not an image (PNG, JPEG, WebP or GIF)") from None
    with img:
        fmt = img.format or ""
        if fmt not in ACCEPTED_FORMATS:
            raise ImageInputError(label, f"{fmt or 'this'} images are not supported (PNG, JPEG, WebP or GIF)")
        width, height = img.size
        if width < 1 or height < 1:
            raise ImageInputError(label, "it has no pixels")
        if limit is not None and width * height > limit:
            raise ImageInputError(label, f"it has too many pixels ({width}x{height})")
        try:
            img.seek(0)
            img.load()
            # Not ImageOps.exif_transpose: it also rewrites the EXIF block, which is dropped here
            # anyway, and a malformed block (a SHORT tag stored as text) makes that raise.
            method = ORIENTATIONS.get(img.getexif().get(ExifTags.Base.Orientation, 1))
            oriented = img if method is None else img.transpose(method)
            if oriented.mode in WIDE_GREY_MODES:
                oriented = _narrow_grey(oriented)
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
            raise ImageInputError(label, "the image file is damaged or incomplete") from None
        mode = "RGBA" if oriented.mode in ("RGBA", "LA", "PA") or "transparency" in oriented.info else "RGB"
        pixels = oriented.convert(mode)
        if max(pixels.size) > INPUT_MAX_SIDE:
            pixels.thumbnail((INPUT_MAX_SIDE, INPUT_MAX_SIDE), Image.Resampling.LANCZOS)
    # A new image from the raw pixels carries no info dict at all, so nothing can leak through.
    clean = Image.frombytes(mode, pixels.size, pixels.tobytes())
    out = io.BytesIO()
    clean.save(out, "PNG", compress_level=6)
    return FetchedImage(out.getvalue(), clean.width, clean.height, fmt)


async def _validate_off_loop(data: bytes, label: str, max_pixels: int | None) -> FetchedImage:
    """:func:`validate_image` on the decoding threads, so that few run at once."""
    call = functools.partial(validate_image, data, label, max_pixels=max_pixels)
    return await asyncio.get_running_loop().run_in_executor(_decoder, call)


# --- Discord attachments --------------------------------------------------------------------


async def read_attachment(
    attachment: discord.Attachment, index: int = 1, *, limits: FetchLimits | None = None
) -> FetchedImage:
    """Read and validate a Discord attachment as image ``index``.

    The size and declared content type are checked before anything is downloaded; the bytes are
    then sniffed and re-encoded like any other input.
    """
    import discord  # the bot side always has it; imported here so workers can import this module

    limits = limits or FetchLimits()
    label = image_label(index, attachment.filename)
    if attachment.size > limits.max_bytes:
        raise ImageInputError(label, f"it is larger than {_size_text(limits.max_bytes)}")
    content_type = (attachment.content_type or "").split(";", 1)[0].strip().lower()
    if content_type and not content_type.startswith("image/"):
        raise ImageInputError(label, f"it is not an image (Discord says {content_type})")
    try:
        async with asyncio.timeout(limits.timeout_s):
            data = await attachment.read()
    except TimeoutError:
        raise ImageInputError(
            label, f"downloading it took longer than {limits.timeout_s:g} seconds"
        ) from None
    except discord.NotFound:
        raise ImageInputError(label, "it was deleted before the bot could read it") from None
    except discord.HTTPException as exc:
        raise ImageInputError(label, f"Discord did not send it (HTTP {exc.status})") from None
    except aiohttp.ClientError:
        # A dropped or cut-off CDN connection is not an HTTP status: discord.py lets it through.
        raise ImageInputError(label, "Discord did not send it (the connection failed)") from None
    if len(data) > limits.max_bytes:
        raise ImageInputError(label, f"it is larger than {_size_text(limits.max_bytes)}")
    return await _validate_off_loop(data, label, limits.max_pixels)


# --- URLs -----------------------------------------------------------------------------------


def _check_url(url: URL, label: str, policy: AddressPolicy) -> None:
    """Refuse a URL before any request: scheme, credentials, host, and literal IP addresses.

    aiohttp does not ask the resolver about a literal IP address, so those are checked here;
    names are checked by :class:`GuardedResolver` when the connection is made.
    """
    if url.scheme not in ("http", "https"):
        raise ImageInputError(label, "only http:// and https:// links can be fetched")
    if not url.host:
        raise ImageInputError(label, "the link has no host name")
    if url.user is not None or url.password is not None:
        raise ImageInputError(label, "links with a user name or password are not fetched")
    try:
        address = ipaddress.ip_address(url.host.strip("[]").split("%", 1)[0])
    except ValueError:
        return
    port = url.port or (443 if url.scheme == "https" else 80)
    reason = policy.problem(address, port)
    if reason is not None:
        raise ImageInputError(label, reason)


async def _download(
    session: aiohttp.ClientSession, start: URL, label: str, policy: AddressPolicy, limits: FetchLimits
) -> bytes:
    url = start
    for hop in range(limits.max_redirects + 1):
        invalid = "the link is not a valid URL" if hop == 0 else REDIRECTED_TO_INVALID
        try:
            _check_url(url, label, policy)
            async with session.get(url, allow_redirects=False) as response:
                if response.status in REDIRECT_STATUSES:
                    location = response.headers.get("Location")
                    if not location:
                        raise ImageInputError(label, "the server redirected without saying where")
                    if hop == limits.max_redirects:
                        raise ImageInputError(
                            label, f"the link redirects more than {limits.max_redirects} times"
                        )
                    try:
                        url = url.join(URL(location))
                    except ValueError:
                        raise ImageInputError(label, REDIRECTED_TO_INVALID) from None
                    continue
                if response.status != 200:
                    raise ImageInputError(label, f"the server answered HTTP {response.status}")
                if response.content_length is not None and response.content_length > limits.max_bytes:
                    raise ImageInputError(label, f"it is larger than {_size_text(limits.max_bytes)}")
                body = bytearray()
                async for chunk in response.content.iter_chunked(CHUNK_BYTES):
                    body += chunk
                    if len(body) > limits.max_bytes:
                        raise ImageInputError(label, f"it is larger than {_size_text(limits.max_bytes)}")
                return bytes(body)
        except aiohttp.ClientError as exc:
            blocked = _blocked_cause(exc)
            if blocked is not None:
                log.info("image fetch refused: %s", blocked)
                raise ImageInputError(label, blocked.reason) from None
            if isinstance(exc, aiohttp.InvalidURL):
                raise ImageInputError(label, invalid) from None
            raise ImageInputError(label, "the server could not be reached") from None
        except ValueError:
            # The IDNA codec refuses a host name it cannot encode ("a..b", a label over 63
            # characters) only when it is looked up, and aiohttp does not wrap that UnicodeError.
            raise ImageInputError(label, invalid) from None
    raise AssertionError("unreachable: the loop returns or raises")


async def fetch_image(
    url: str,
    *,
    label: str | None = None,
    limits: FetchLimits | None = None,
    allow_addresses: Collection[str] = (),
    resolver: AbstractResolver | None = None,
) -> FetchedImage:
    """Download the image at ``url`` through the guarded client and validate it.

    ``allow_addresses`` ("127.0.0.1:8080", "::1") lets otherwise refused addresses through; only
    tests pass it. ``resolver`` replaces the system resolver underneath the address checks
    (tests map made-up names to private addresses with it). Every failure is an
    :class:`ImageInputError`.
    """
    limits = limits or FetchLimits()
    label = label or image_label(1, url)
    try:
        parsed = URL(url.strip())
    except (ValueError, TypeError):
        raise ImageInputError(label, "the link is not a valid URL") from None
    policy = AddressPolicy(allow_addresses)
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(policy, resolver), use_dns_cache=False)
    timeout = aiohttp.ClientTimeout(total=limits.timeout_s)
    # trust_env=False: a proxy from the environment would make the connection, and the address
    # checks would then only see the proxy.
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        trust_env=False,
        headers={"User-Agent": "MirageBot (image fetch)", "Accept": "image/*"},
    ) as session:
        try:
            async with asyncio.timeout(limits.timeout_s):
                data = await _download(session, parsed, label, policy, limits)
        except TimeoutError:
            raise ImageInputError(
                label, f"downloading it took longer than {limits.timeout_s:g} seconds"
            ) from None
    return await _validate_off_loop(data, label, limits.max_pixels)


async def fetch_images(
    urls: Sequence[str],
    *,
    first_index: int = 1,
    limits: FetchLimits | None = None,
    allow_addresses: Collection[str] = (),
    resolver: AbstractResolver | None = None,
) -> list[FetchedImage]:
    """Fetch several image URLs concurrently, in order; the first failure is raised.

    Images are labelled ``image first_index``, ``image first_index + 1``… so that messages match
    the order the member wrote them in.
    """
    tasks = [
        fetch_image(
            url,
            label=image_label(first_index + offset, url),
            limits=limits,
            allow_addresses=allow_addresses,
            resolver=resolver,
        )
        for offset, url in enumerate(urls)
    ]
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return [result for result in results if isinstance(result, FetchedImage)]


@dataclass(frozen=True)
class References:
    """Every picture a prompt points to, fetched and cleaned, by role.

    ``style_codes`` keeps the ``--sref`` values that are not links (numeric style codes,
    ``random``): they are not pictures and are the caller's to interpret.
    """

    prompt_images: tuple[FetchedImage, ...] = ()
    style_images: tuple[FetchedImage, ...] = ()
    character_images: tuple[FetchedImage, ...] = ()
    omni_images: tuple[FetchedImage, ...] = ()
    style_codes: tuple[str, ...] = ()


def _is_link(value: str) -> bool:
    return value.strip().lower().startswith(("http://", "https://"))


async def fetch_references(
    params: GenerationParams,
    *,
    limits: FetchLimits | None = None,
    allow_addresses: Collection[str] = (),
    resolver: AbstractResolver | None = None,
    first_image_index: int = 1,
) -> References:
    """Fetch the image prompts, ``--sref``, ``--cref`` and ``--oref`` links of a parsed prompt.

    Messages name each picture as the member wrote it: ``image 2 (…)`` for image prompts,
    ``--sref image 1 (…)``, ``--cref image 1 (…)``, ``--oref image (…)``. Image prompts are
    numbered from ``first_image_index`` (2 when an attachment is image 1). All links are fetched
    concurrently; the first failure is raised as :class:`ImageInputError`.
    """
    # The parser keeps a reference's weight with it (url::2); it is no part of the link.
    style_links = [split_reference(ref)[0] for ref in params.style_refs if _is_link(ref)]
    groups: list[list[tuple[str, str]]] = [
        [(url, image_label(i, url)) for i, url in enumerate(params.image_prompts, start=first_image_index)],
        [(url, f"--sref {image_label(i, url)}") for i, url in enumerate(style_links, start=1)],
        [(url, f"--cref {image_label(i, url)}") for i, url in enumerate(params.character_refs, start=1)],
        [(url, f"--oref {image_label(None, url)}") for url in filter(None, [params.omni_ref])],
    ]
    flat = [item for group in groups for item in group]
    results = await asyncio.gather(
        *(
            fetch_image(url, label=label, limits=limits, allow_addresses=allow_addresses, resolver=resolver)
            for url, label in flat
        ),
        return_exceptions=True,
    )
    for result in results:
        if isinstance(result, BaseException):
            raise result
    images = [result for result in results if isinstance(result, FetchedImage)]
    split: list[tuple[FetchedImage, ...]] = []
    start = 0
    for group in groups:
        split.append(tuple(images[start : start + len(group)]))
        start += len(group)
    return References(
        prompt_images=split[0],
        style_images=split[1],
        character_images=split[2],
        omni_images=split[3],
        style_codes=tuple(ref for ref in params.style_refs if not _is_link(ref)),
    )
