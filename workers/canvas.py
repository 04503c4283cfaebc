"""Outpainting canvases for zoom out, pan and make square, with Pillow and numpy only (no torch).

Every function returns ``(canvas, mask)``:

- ``canvas`` is the output-size RGB image: the original (shrunk for zoom, shifted for pan,
  centred for square) plus a pre-filled border made of its own edge colours, stretched outwards
  and blurred. The pre-fill gives an inpainting model a colour hint for the new area, and keeps
  the seam soft if any of it survives the blend.
- ``mask`` is an ``L`` image: 255 exactly on the new area to paint, 0 exactly where the original
  is. It is deliberately hard-edged so callers (and tests) can rely on its geometry; the soft
  seam comes from :func:`inpaint_mask` (repaint a little into the original) and
  :func:`blend_seam` (paste the original back with a feathered edge).

The original always occupies one axis-aligned box, so the feathering is computed analytically
from that box instead of with Pillow's rank filters, which are far too slow at 1024 px with a
32 px radius.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from workers.schema import Direction, ErrorCode, WorkerError

PAN_FRACTION = 0.4  # Midjourney's pan reveals 30-50 % more; the middle keeps the subject large.
MAX_ZOOM = 4.0

Box = tuple[int, int, int, int]  # left, top, right, bottom (right/bottom exclusive)


def round_to(value: float, multiple: int) -> int:
    """``value`` rounded to the nearest positive multiple of ``multiple``."""
    return max(multiple, round(value / multiple) * multiple)


def feather_for(size: tuple[int, int]) -> int:
    """Seam feather width for a canvas: 1/32 of its short side (32 px at 1024), at least 2 px."""
    return max(2, round(min(size) / 32))


def _edge_filled(inner: Image.Image, size: tuple[int, int], box: Box) -> Image.Image:
    """A ``size`` canvas with ``inner`` at ``box`` and every other pixel its nearest edge colour, blurred."""
    width, height = size
    left, top, right, bottom = box
    pixels = np.asarray(inner.convert("RGB"))
    # Clamp-to-edge: each canvas pixel takes the colour of the closest pixel of the original.
    rows = np.clip(np.arange(height) - top, 0, bottom - top - 1)
    cols = np.clip(np.arange(width) - left, 0, right - left - 1)
    stretched = Image.fromarray(np.ascontiguousarray(pixels[rows][:, cols]))
    # Streaks from clamping look like hard structure; a wide blur leaves only the colour mood.
    blurred = stretched.filter(ImageFilter.GaussianBlur(radius=max(2, max(size) // 24)))
    blurred.paste(inner.convert("RGB"), (left, top))
    return blurred


def _mask_outside(size: tuple[int, int], box: Box) -> Image.Image:
    """255 everywhere except 0 inside ``box``."""
    mask = Image.new("L", size, 255)
    mask.paste(0, box)
    return mask


def keep_box(mask: Image.Image) -> Box:
    """The box where ``mask`` is 0 (the original's place on the canvas)."""
    keep = np.asarray(mask) == 0
    if not keep.any():
        raise ValueError("mask has no area to keep")
    rows = np.flatnonzero(keep.any(axis=1))
    cols = np.flatnonzero(keep.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _fit_multiple(image: Image.Image, multiple: int) -> Image.Image:
    """``image`` resized so both sides are multiples of ``multiple`` (unchanged if they already are)."""
    size = (round_to(image.width, multiple), round_to(image.height, multiple))
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.LANCZOS)


def zoom_canvas(image: Image.Image, scale: float) -> tuple[Image.Image, Image.Image]:
    """Zoom out: ``image`` shrunk by ``1/scale``, centred on a canvas of the same size.

    The output keeps the input's size, as Midjourney's Zoom Out does; the mask is the border.
    """
    if not 1.0 < scale <= MAX_ZOOM:
        raise WorkerError(ErrorCode.BAD_INPUT, f"Zoom out needs a factor above 1 and up to {MAX_ZOOM:g}.")
    width, height = image.size
    inner_w, inner_h = max(1, round(width / scale)), max(1, round(height / scale))
    left, top = (width - inner_w) // 2, (height - inner_h) // 2
    box = (left, top, left + inner_w, top + inner_h)
    inner = image.convert("RGB").resize((inner_w, inner_h), Image.Resampling.LANCZOS)
    return _edge_filled(inner, image.size, box), _mask_outside(image.size, box)


def pan_canvas(
    image: Image.Image,
    direction: Direction,
    *,
    fraction: float = PAN_FRACTION,
    multiple: int = 16,
    max_side: int | None = None,
) -> tuple[Image.Image, Image.Image]:
    """Pan: extend the ``direction`` side by about ``fraction`` of the image.

    Both output sides are multiples of ``multiple`` (what the model's latent grid needs). With
    ``max_side``, the original is first shrunk so repeated pans cannot grow the canvas beyond it.
    """
    image = _fit_multiple(image.convert("RGB"), multiple)
    horizontal = direction in (Direction.LEFT, Direction.RIGHT)
    along = image.width if horizontal else image.height
    extra = round_to(along * fraction, multiple)
    if max_side is not None and along + extra > max_side:
        # Shrink keeping the picture's shape: only its side across the pan is rounded to the
        # multiple, since the band makes up the canvas side along it. Rounding both of its
        # sides on their own squashed it (by 6 % for a 1536x640 bucket panned sideways).
        across = image.height if horizontal else image.width
        new_across = round_to(across * max_side / (along + extra), multiple)
        along = max(1, round(along * new_across / across))
        shrunk = (along, new_across) if horizontal else (new_across, along)
        image = image.resize(shrunk, Image.Resampling.LANCZOS)
        total = min(max_side, round_to(along * (1 + fraction), multiple))
        if total <= along:  # only for a picture a few multiples small: still reveal one band
            total = (along // multiple + 1) * multiple
        extra = total - along
    width, height = image.size
    if horizontal:
        size = (width + extra, height)
        left = extra if direction is Direction.LEFT else 0
        box = (left, 0, left + width, height)
    else:
        size = (width, height + extra)
        top = extra if direction is Direction.UP else 0
        box = (0, top, width, top + height)
    return _edge_filled(image, size, box), _mask_outside(size, box)


def square_canvas(
    image: Image.Image, *, side: int | None = None, multiple: int = 16
) -> tuple[Image.Image, Image.Image]:
    """Make square: ``image`` centred on a square, the strips on either side to paint.

    ``side`` sets the output side (the image is scaled to fit it: the model's native size keeps
    quality and cost fixed); without it the square is the long side rounded up to ``multiple``.
    """
    width, height = image.size
    if width == height:
        raise WorkerError(ErrorCode.BAD_INPUT, "The image is already square.")
    long_side = max(width, height)
    if side is None:
        side = -(-long_side // multiple) * multiple
    factor = side / long_side
    inner_w, inner_h = max(1, round(width * factor)), max(1, round(height * factor))
    if (inner_w, inner_h) != (width, height):
        image = image.resize((inner_w, inner_h), Image.Resampling.LANCZOS)
    left, top = (side - inner_w) // 2, (side - inner_h) // 2
    box = (left, top, left + inner_w, top + inner_h)
    return _edge_filled(image.convert("RGB"), (side, side), box), _mask_outside((side, side), box)


def _inner_distance(size: tuple[int, int], box: Box) -> np.ndarray:
    """Per pixel: how far inside ``box`` it is, counting only box edges that face a painted area.

    Edges lying on the canvas border (a pan's far side) are not seams, so they do not count.
    Pixels outside the box get a negative distance.
    """
    width, height = size
    left, top, right, bottom = box
    xs = np.arange(width, dtype=np.float32)
    ys = np.arange(height, dtype=np.float32)
    inf = np.float32(np.inf)
    dx = np.minimum(xs - left + 0.5 if left > 0 else inf, right - xs - 0.5 if right < width else inf)
    dy = np.minimum(ys - top + 0.5 if top > 0 else inf, bottom - ys - 0.5 if bottom < height else inf)
    inside_x = (xs >= left) & (xs < right)
    inside_y = (ys >= top) & (ys < bottom)
    dx = np.where(inside_x, dx, -1.0)
    dy = np.where(inside_y, dy, -1.0)
    return np.minimum(dy[:, None], dx[None, :])


def inpaint_mask(mask: Image.Image, grow: int) -> Image.Image:
    """``mask`` grown ``grow`` pixels into the original along its seams, for the inpainting call.

    Letting the model repaint a thin band of the original makes the new area continue it, instead
    of meeting it at a hard edge; :func:`blend_seam` then fades the original back in over it.
    """
    distance = _inner_distance(mask.size, keep_box(mask))
    return Image.fromarray(np.where(distance > grow, 0, 255).astype(np.uint8))


def blend_seam(generated: Image.Image, canvas: Image.Image, mask: Image.Image, feather: int) -> Image.Image:
    """Paste the original (from ``canvas``) back over ``generated``, fading out over ``feather`` px.

    Deep inside the original the pixels are exactly the original's; across the seam they ramp
    linearly to the generated image, which is fully kept everywhere the mask is set.
    """
    if generated.size != canvas.size:
        generated = generated.resize(canvas.size, Image.Resampling.LANCZOS)
    distance = _inner_distance(mask.size, keep_box(mask))
    alpha = np.clip(distance / max(1, feather), 0.0, 1.0)[..., None]
    original = np.asarray(canvas.convert("RGB"), dtype=np.float32)
    painted = np.asarray(generated.convert("RGB"), dtype=np.float32)
    mixed = painted + (original - painted) * alpha
    return Image.fromarray(np.clip(np.rint(mixed), 0, 255).astype(np.uint8))
