"""Outpainting canvases (Pillow + numpy only): geometry of zoom, pan and square, seam blending."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from workers import canvas
from workers.schema import Direction, ErrorCode, WorkerError


def _pattern(width: int, height: int) -> Image.Image:
    """A deterministic image with structure everywhere, so misplaced pixels are caught."""
    ys, xs = np.mgrid[0:height, 0:width]
    pixels = np.stack([(xs * 7) % 256, (ys * 11) % 256, ((xs + ys) * 5) % 256], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8))


def _zero_box(mask: Image.Image) -> tuple[int, int, int, int]:
    return canvas.keep_box(mask)


@pytest.mark.parametrize(("size", "scale"), [((64, 64), 2.0), ((96, 64), 1.5), ((1024, 1024), 2.0)])
def test_zoom_keeps_the_original_centred(size: tuple[int, int], scale: float) -> None:
    source = _pattern(*size)
    image, mask = canvas.zoom_canvas(source, scale)
    assert image.size == size and mask.size == size and mask.mode == "L"
    inner_w, inner_h = round(size[0] / scale), round(size[1] / scale)
    left, top = (size[0] - inner_w) // 2, (size[1] - inner_h) // 2
    expected = np.asarray(source.resize((inner_w, inner_h), Image.Resampling.LANCZOS))
    got = np.asarray(image)[top : top + inner_h, left : left + inner_w]
    assert np.array_equal(got, expected)
    # The mask is exactly the border: 0 on the original, 255 everywhere else, nothing between.
    m = np.asarray(mask)
    assert set(np.unique(m)) == {0, 255}
    assert _zero_box(mask) == (left, top, left + inner_w, top + inner_h)
    assert (m[top : top + inner_h, left : left + inner_w] == 0).all()
    assert (m == 0).sum() == inner_w * inner_h


def test_zoom_border_is_prefilled_with_edge_colours() -> None:
    source = Image.new("RGB", (64, 64), (200, 30, 40))
    image, _ = canvas.zoom_canvas(source, 2.0)
    pixels = np.asarray(image).reshape(-1, 3)
    # A flat image stays flat: the fill comes from its edges, not black or noise.
    assert np.abs(pixels.astype(int) - [200, 30, 40]).max() <= 1


def test_zoom_rejects_bad_factors() -> None:
    with pytest.raises(WorkerError) as info:
        canvas.zoom_canvas(_pattern(64, 64), 1.0)
    assert info.value.code is ErrorCode.BAD_INPUT


@pytest.mark.parametrize(
    ("direction", "size", "box"),
    [
        (Direction.RIGHT, (96, 64), (0, 0, 64, 64)),
        (Direction.LEFT, (96, 64), (32, 0, 96, 64)),
        (Direction.DOWN, (64, 96), (0, 0, 64, 64)),
        (Direction.UP, (64, 96), (0, 32, 64, 96)),
    ],
)
def test_pan_extends_the_chosen_side(
    direction: Direction, size: tuple[int, int], box: tuple[int, int, int, int]
) -> None:
    source = _pattern(64, 64)
    image, mask = canvas.pan_canvas(source, direction, multiple=16)
    # 64 * 0.4 = 25.6 -> rounded to the model's multiple of 16 -> 32 more pixels.
    assert image.size == size == mask.size
    assert _zero_box(mask) == box
    left, top, right, bottom = box
    assert np.array_equal(np.asarray(image)[top:bottom, left:right], np.asarray(source))
    assert (np.asarray(mask) == 255).sum() == size[0] * size[1] - 64 * 64


def test_pan_sides_are_multiples_and_capped() -> None:
    image, mask = canvas.pan_canvas(_pattern(1344, 768), Direction.RIGHT, multiple=64, max_side=2048)
    assert image.width % 64 == 0 and image.height % 64 == 0
    assert image.width <= 2048
    left, top, right, bottom = _zero_box(mask)
    assert (left, top) == (0, 0) and right < image.width and bottom == image.height


@pytest.mark.parametrize("bucket", [(1536, 640), (1792, 576), (2048, 512)])
@pytest.mark.parametrize("direction", [Direction.RIGHT, Direction.UP])
def test_capped_pan_keeps_the_picture_shape(bucket: tuple[int, int], direction: Direction) -> None:
    # Wide buckets panned sideways (and tall ones upwards) exceed max_side and are shrunk first;
    # rounding both sides to 64 on its own squashed the kept original by up to 6 %.
    size = bucket if direction is Direction.RIGHT else bucket[::-1]
    image, mask = canvas.pan_canvas(_pattern(*size), direction, multiple=64, max_side=2048)
    assert image.width % 64 == 0 and image.height % 64 == 0 and max(image.size) <= 2048
    left, top, right, bottom = _zero_box(mask)
    width, height = right - left, bottom - top
    assert abs(width - height * size[0] / size[1]) <= 1 and abs(height - width * size[1] / size[0]) <= 1
    if direction is Direction.RIGHT:  # the original fills the height and starts at the left edge
        assert (left, top, bottom) == (0, 0, image.height) and right < image.width
    else:  # it fills the width and ends at the bottom edge
        assert (left, right, bottom) == (0, image.width, image.height) and top > 0


def test_square_centres_a_wide_image() -> None:
    source = _pattern(64, 32)
    image, mask = canvas.square_canvas(source, multiple=16)
    assert image.size == (64, 64)
    assert _zero_box(mask) == (0, 16, 64, 48)
    assert np.array_equal(np.asarray(image)[16:48], np.asarray(source))


def test_square_scales_to_the_requested_side() -> None:
    image, mask = canvas.square_canvas(_pattern(1344, 768), side=1024)
    assert image.size == (1024, 1024)
    left, top, right, bottom = _zero_box(mask)
    assert (left, right) == (0, 1024) and bottom - top == round(768 * 1024 / 1344)


def test_square_refuses_a_square_image() -> None:
    with pytest.raises(WorkerError) as info:
        canvas.square_canvas(_pattern(64, 64))
    assert info.value.code is ErrorCode.BAD_INPUT


def test_inpaint_mask_grows_into_the_original_only_along_seams() -> None:
    _, mask = canvas.pan_canvas(_pattern(64, 64), Direction.RIGHT, multiple=16)
    grown = np.asarray(canvas.inpaint_mask(mask, 4))
    # Only the seam side (x = 64) moves; the original's canvas-border sides do not.
    assert canvas.keep_box(Image.fromarray(grown)) == (0, 0, 60, 64)


def test_blend_seam_restores_the_original_and_keeps_the_new_area() -> None:
    source = _pattern(64, 64)
    image, mask = canvas.zoom_canvas(source, 2.0)
    generated = Image.new("RGB", image.size, (0, 255, 0))
    out = np.asarray(canvas.blend_seam(generated, image, mask, feather=4)).astype(int)
    original = np.asarray(image).astype(int)
    # Deep inside: the original exactly; in the border: the generated pixels exactly.
    assert np.array_equal(out[20:44, 20:44], original[20:44, 20:44])
    assert (out[:16] == [0, 255, 0]).all() and (out[:, 48:] == [0, 255, 0]).all()
    # On the seam: a mix of both.
    seam = out[32, 16]
    assert not np.array_equal(seam, original[32, 16]) and not np.array_equal(seam, [0, 255, 0])
