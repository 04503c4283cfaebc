"""Canvas geometry for outpainting through ``images.edit``: zoom out, pan and make square.

The Images API paints wherever the mask is fully transparent and keeps the rest, and it only
returns a few fixed sizes. So every outpaint is: lay the original out on a larger virtual canvas
(centred and shrunk for zoom, shifted for pan), fit that layout into the nearest allowed output
size, and mark everything outside the original as transparent in both the image and the mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

from workers.openai_engine.models import Size, nearest_size
from workers.schema import Direction, ErrorCode, WorkerError

# Pan extends one side by half the image, the upper end of the 30-50 % Midjourney uses: the
# fixed output sizes shrink the original anyway, so a smaller band would mostly be wasted.
PAN_FRACTION = 0.5
# An --ar within 1 % of the picture's own ratio is the same shape.
ASPECT_TOLERANCE = 0.01


@dataclass(frozen=True)
class Layout:
    """The virtual canvas in units of the original image, and where the original sits in it."""

    width: float
    height: float
    left: float
    top: float


def zoom_layout(size: Size, scale: float, aspect: tuple[int, int] | None = None) -> Layout:
    """Zoom out by ``scale`` (1 to 4): the original centred on a canvas ``scale`` times larger.

    With ``aspect`` of another shape than the original's (Custom Zoom with a new ``--ar``), the
    canvas is widened or heightened to that ratio as well; a zoom of 1 then only extends it.
    """
    if not 1.0 <= scale <= 4.0:
        raise WorkerError(ErrorCode.BAD_INPUT, f"Zoom out needs a factor from 1 to 4, got {scale}.")
    w, h = size
    width, height = w * scale, h * scale
    if aspect is not None and abs(math.log(aspect[0] / aspect[1]) - math.log(w / h)) > ASPECT_TOLERANCE:
        ratio = aspect[0] / aspect[1]
        if width / height < ratio:
            width = height * ratio
        else:
            height = width / ratio
    elif scale == 1.0:
        raise WorkerError(ErrorCode.BAD_INPUT, "A zoom of 1 changes nothing without a new --ar shape.")
    return Layout(width, height, (width - w) / 2, (height - h) / 2)


def pan_layout(size: Size, direction: Direction) -> Layout:
    """Pan: the canvas grows by ``PAN_FRACTION`` on the side being revealed."""
    w, h = size
    extra_w, extra_h = w * PAN_FRACTION, h * PAN_FRACTION
    if direction is Direction.LEFT:
        return Layout(w + extra_w, h, extra_w, 0)
    if direction is Direction.RIGHT:
        return Layout(w + extra_w, h, 0, 0)
    if direction is Direction.UP:
        return Layout(w, h + extra_h, 0, extra_h)
    return Layout(w, h + extra_h, 0, 0)


def square_layout(size: Size) -> Layout:
    """Make square: the original centred on a square as long as its longer side."""
    w, h = size
    side = max(w, h)
    return Layout(side, side, (side - w) / 2, (side - h) / 2)


def outpaint_canvas(
    image: Image.Image, layout: Layout, sizes: tuple[Size, ...]
) -> tuple[Image.Image, Image.Image, Size]:
    """The RGBA canvas, its mask and the output size for one outpaint request.

    The layout is fitted inside the allowed size nearest its aspect ratio; any space left over
    (the layout's aspect rarely matches a fixed size exactly) is transparent too, so the model
    fills it rather than leaving bars. The original is opaque, whatever alpha it came with,
    because a transparent pixel inside it would be repainted.
    """
    out_w, out_h = nearest_size(sizes, layout.width, layout.height)
    k = min(out_w / layout.width, out_h / layout.height)
    off_x = (out_w - layout.width * k) / 2
    off_y = (out_h - layout.height * k) / 2
    left = round(off_x + layout.left * k)
    top = round(off_y + layout.top * k)
    inner_w = max(1, round(image.width * k))
    inner_h = max(1, round(image.height * k))
    inner_w, inner_h = min(inner_w, out_w - left), min(inner_h, out_h - top)

    shrunk = image.convert("RGB").resize((inner_w, inner_h), Image.Resampling.LANCZOS)
    canvas = Image.new("RGBA", (out_w, out_h), (0, 0, 0, 0))
    canvas.paste(shrunk.convert("RGBA"), (left, top))
    # A separate mask keeps the contract explicit: alpha 0 = paint here, 255 = keep.
    mask = Image.new("RGBA", (out_w, out_h), (0, 0, 0, 0))
    mask.paste((0, 0, 0, 255), (left, top, left + inner_w, top + inner_h))
    return canvas, mask, (out_w, out_h)


def centre_square(image: Image.Image, side: int) -> Image.Image:
    """The largest centred square of ``image``, resized to ``side`` (dall-e-2 variations need squares)."""
    short = min(image.size)
    left = (image.width - short) // 2
    top = (image.height - short) // 2
    square = image.convert("RGB").crop((left, top, left + short, top + short))
    return square.resize((side, side), Image.Resampling.LANCZOS)


def upscale_lanczos(image: Image.Image, factor: float) -> Image.Image:
    """A plain Lanczos resample by ``factor``: the API has no upscaler."""
    if not 1.0 < factor <= 4.0:
        raise WorkerError(ErrorCode.BAD_INPUT, f"Upscale needs a factor between 1 and 4, got {factor}.")
    size = (round(image.width * factor), round(image.height * factor))
    return image.convert("RGB").resize(size, Image.Resampling.LANCZOS)
