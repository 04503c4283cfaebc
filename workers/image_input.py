"""Input images on the worker side: decoded once, checked, and given back as plain RGB pictures.

The bot has already fetched, checked and re-encoded every image (``bot/imagefetch.py``), but a
worker trusts nothing that comes over the broker: the bytes are decoded again here with the same
pixel cap, and any problem becomes a ``WorkerError(BAD_INPUT)`` naming the image.

Also here, torch-free for both engines: the Vary (Region) mask and the paste-back outside it.
"""

from __future__ import annotations

import binascii
import io
import warnings

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image, ImageFilter, ImageOps

from workers.schema import ErrorCode, WorkerError, b64decode_text

MAX_INPUT_PIXELS = 64 * 1024 * 1024  # 8192 x 8192: above anything the bot lets through


def decode_image(data: bytes | str, label: str, *, max_pixels: int = MAX_INPUT_PIXELS) -> Image.Image:
    """Decode an input image (bytes, or base64 text from a message) into an RGB picture.

    ``label`` names the image in the error ("image 2"). Raises ``WorkerError(BAD_INPUT)`` for
    bad base64, anything Pillow cannot read, and images with more than ``max_pixels`` pixels
    (checked from the header, before decoding).
    """
    if isinstance(data, str):
        try:
            data = b64decode_text(data)
        except (binascii.Error, ValueError):
            raise WorkerError(ErrorCode.BAD_INPUT, f"{_cap(label)} is not valid base64 data.") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        if img.width * img.height > max_pixels:
            raise WorkerError(
                ErrorCode.BAD_INPUT, f"{_cap(label)} has too many pixels ({img.width}x{img.height})."
            )
        img.seek(0)
        img.load()
        rgb = ImageOps.exif_transpose(img).convert("RGB")
    except WorkerError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise WorkerError(ErrorCode.BAD_INPUT, f"{_cap(label)} has too many pixels.") from None
    except (OSError, SyntaxError, ValueError, EOFError):
        raise WorkerError(ErrorCode.BAD_INPUT, f"{_cap(label)} is not a readable image.") from None
    return rgb


def _cap(label: str) -> str:
    return label[:1].upper() + label[1:]


def region_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """A Vary (Region) mask at ``size``: 255 where to repaint (white in the upload), else 0.

    Raises ``BAD_INPUT`` when nothing is selected, since the grid would repeat the input.
    """
    grey = mask.convert("L")
    if grey.size != size:
        grey = grey.resize(size, Image.Resampling.BILINEAR)
    binary = Image.fromarray(np.where(np.asarray(grey) >= 128, 255, 0).astype(np.uint8))
    if not binary.getbbox():
        raise WorkerError(ErrorCode.BAD_INPUT, "The region mask selects nothing to repaint.")
    return binary


def grow_mask(mask: Image.Image, radius: int) -> Image.Image:
    """``mask`` (``L``) grown by ``radius`` px: exactly Pillow's ``MaxFilter(2 * radius + 1)``.

    Pillow's rank filter takes about 3 s for a 1024 px mask at a 32 px radius, and Vary
    (Region) grows its mask five times a grid; a square maximum is two one-axis maxima, which
    numpy takes in milliseconds.
    """
    pixels = np.asarray(mask.convert("L"))
    for axis in (0, 1):
        # Repeating the edge adds no new value to a maximum, as Pillow's own edge handling.
        pad = [(radius, radius) if index == axis else (0, 0) for index in (0, 1)]
        padded = np.pad(pixels, pad, mode="edge")
        pixels = sliding_window_view(padded, 2 * radius + 1, axis=axis).max(axis=-1)
    return Image.fromarray(np.ascontiguousarray(pixels))


def paste_outside(painted: Image.Image, source: Image.Image, mask: Image.Image, feather: int) -> Image.Image:
    """``source`` everywhere outside ``mask``; ``painted`` inside it, fading over ``feather`` px.

    The fade lies outside the mask's edge, so pixels more than ``2 * feather`` from the region
    are exactly the source's and the whole region is exactly the new painting.
    """
    if painted.size != source.size:
        painted = painted.resize(source.size, Image.Resampling.LANCZOS)
    grown = grow_mask(mask, feather)
    soft = np.asarray(grown.filter(ImageFilter.BoxBlur(feather)), dtype=np.float32) / 255
    alpha = np.maximum(soft, np.asarray(mask, dtype=np.float32) / 255)[..., None]
    new = np.asarray(painted.convert("RGB"), dtype=np.float32)
    old = np.asarray(source.convert("RGB"), dtype=np.float32)
    return Image.fromarray(np.clip(np.rint(old + (new - old) * alpha), 0, 255).astype(np.uint8))
