"""Pillow-only image helpers shared by both sides: grids, decoding, encoding under a byte limit.

Like ``workers.schema`` this module imports no torch, so the bot may use it (U# crops are a
split of the grid; oversized grids are re-encoded before upload). Result images are encoded with
:func:`encode_image`; :func:`encode_png` makes the PNG files that uploads to APIs need.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from PIL import Image, ImageFile, UnidentifiedImageError

from workers.schema import ErrorCode, ImageFormat, WorkerError

# A decompression bomb is hostile input, not an engine failure: refuse images above ~64 MP.
MAX_INPUT_PIXELS = 64 * 1024 * 1024
Image.MAX_IMAGE_PIXELS = MAX_INPUT_PIXELS
ImageFile.LOAD_TRUNCATED_IMAGES = False


def compose_grid(images: Sequence[Image.Image]) -> Image.Image:
    """Lay four same-size images out as Midjourney's 2x2 grid (1 2 / 3 4)."""
    if len(images) != 4:
        raise ValueError(f"a grid needs 4 images, got {len(images)}")
    width, height = images[0].size
    if any(image.size != (width, height) for image in images):
        raise ValueError("grid images must share one size")
    grid = Image.new("RGB", (width * 2, height * 2))
    for index, image in enumerate(images):
        # convert() copies even an RGB image; pasting RGB as it is saves four 3-12 MB copies.
        tile = image if image.mode == "RGB" else image.convert("RGB")
        grid.paste(tile, ((index % 2) * width, (index // 2) * height))
    return grid


def split_grid(grid: Image.Image) -> list[Image.Image]:
    """The four tiles of a 2x2 grid, in U1..U4 order."""
    width, height = grid.width // 2, grid.height // 2
    return [
        grid.crop(
            ((index % 2) * width, (index // 2) * height, (index % 2 + 1) * width, (index // 2 + 1) * height)
        )
        for index in range(4)
    ]


def decode_image(data: bytes) -> Image.Image:
    """Bytes to an RGB image, or ``WorkerError(BAD_INPUT)`` for anything that is not one."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        raise WorkerError(
            ErrorCode.BAD_INPUT, "The input image could not be read (corrupt or not an image)."
        ) from exc


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes with no metadata: no text chunks, no EXIF, no ICC profile."""
    if image.mode not in ("RGB", "RGBA", "L", "LA"):
        image = image.convert("RGBA" if "A" in image.getbands() or image.mode == "P" else "RGB")
    clean = Image.new(image.mode, image.size)
    clean.paste(image)
    buffer = io.BytesIO()
    clean.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


# libwebp's lossless presets, (method, quality) per level 0..9: what ``cwebp -lossless -z N``
# uses (WebPConfigLosslessPreset), so one compress level means the same effort as the CLI.
WEBP_LOSSLESS_PRESETS: tuple[tuple[int, int], ...] = (
    (0, 0), (1, 20), (2, 25), (3, 30), (3, 50), (4, 50), (4, 75), (4, 90), (5, 90), (6, 100),
)  # fmt: skip

# Measured on 2048x2048 grids (bench/bench_encode.py): the fastest lossless level of each format.
DEFAULT_COMPRESS_LEVEL = {ImageFormat.PNG: 1, ImageFormat.WEBP: 0}


def encode_image(image: Image.Image, image_format: ImageFormat, compress_level: int | None = None) -> bytes:
    """Losslessly encode ``image`` as ``image_format`` without metadata (no EXIF, ICC, text).

    ``compress_level`` (0..9) is the zlib level for PNG and the lossless preset for WebP; None
    takes the format's measured default. RGB and RGBA keep their mode, anything else becomes RGB
    (or RGBA when it has transparency).
    """
    level = DEFAULT_COMPRESS_LEVEL[image_format] if compress_level is None else compress_level
    if not 0 <= level <= 9:
        raise ValueError(f"compress level {level} is outside 0..9")
    if image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGBA" if "A" in image.getbands() or "transparency" in image.info else "RGB")
    if image.info:
        # The encoders copy ICC profiles, EXIF and text from ``info``: start from none. A
        # freshly made grid has an empty ``info``, so the common case costs no copy.
        image = image.copy()
        image.info = {}
    buffer = io.BytesIO()
    if image_format is ImageFormat.PNG:
        image.save(buffer, format="PNG", compress_level=level)
    else:
        method, quality = WEBP_LOSSLESS_PRESETS[level]
        image.save(buffer, format="WEBP", lossless=True, method=method, quality=quality, exact=True)
    return buffer.getvalue()


def encode_under(image: Image.Image, max_bytes: int) -> tuple[bytes, str]:
    """Encode within ``max_bytes``: PNG if it fits, else WebP then JPEG at falling quality, else smaller.

    Returns the bytes and the file extension. An image is never dropped: the last resort halves
    the size until it fits.
    """
    data = encode_png(image)
    if len(data) <= max_bytes:
        return data, "png"
    rgb = image.convert("RGB")
    current = rgb
    while True:
        for fmt, ext in (("WEBP", "webp"), ("JPEG", "jpg")):
            for quality in (90, 80, 70):
                buffer = io.BytesIO()
                current.save(buffer, format=fmt, quality=quality)
                if buffer.tell() <= max_bytes:
                    return buffer.getvalue(), ext
        if current.width <= 16 or current.height <= 16:
            raise ValueError(f"cannot encode an image under {max_bytes} bytes")
        current = current.resize(
            (max(1, current.width // 2), max(1, current.height // 2)), Image.Resampling.LANCZOS
        )
