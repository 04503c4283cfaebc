"""Tile geometry for the tiled img2img upscale (plain Python: easy to reason about and test)."""

from __future__ import annotations

import math


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``length`` with at least ``overlap`` shared.

    The tiles are spread evenly, so the last one ends exactly at ``length`` and every overlap is
    at least the requested one (often more). One tile when it already covers everything.
    """
    if length <= tile:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError("overlap must be smaller than the tile")
    count = math.ceil((length - overlap) / (tile - overlap))
    count = max(count, 2)
    return [round(index * (length - tile) / (count - 1)) for index in range(count)]


def tile_grid(width: int, height: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Tiles as ``(left, top, right, bottom)`` boxes, row by row, each at most ``tile`` a side."""
    tile_w, tile_h = min(tile, width), min(tile, height)
    return [
        (left, top, left + tile_w, top + tile_h)
        for top in tile_starts(height, tile_h, min(overlap, tile_h - 1))
        for left in tile_starts(width, tile_w, min(overlap, tile_w - 1))
    ]


def ramp(start: int, end: int, length: int, width: int) -> list[float]:
    """Blend weights along one axis for a tile spanning ``[start, end)`` of ``length``.

    The weight rises linearly over ``width`` cells from each edge that meets a neighbour tile,
    and stays 1 at the image's own borders, so the weighted average fades tiles into each other
    without darkening the outer edges. Never exactly 0, so every cell has some weight.
    """
    weights = []
    for offset in range(end - start):
        near = math.inf
        if start > 0:
            near = min(near, offset + 0.5)
        if end < length:
            near = min(near, end - start - offset - 0.5)
        weights.append(max(1e-3, min(1.0, near / max(1, width))))
    return weights


def fewest_tile_starts(length: int, max_tile: int, overlap: int, multiple: int) -> tuple[int, list[int]]:
    """The fewest tiles of one size (at most ``max_tile``, a multiple of ``multiple``) covering ``length``.

    Neighbours share at least ``overlap`` cells. Returns ``(tile, starts)``: the tile is the
    smallest multiple of ``multiple`` that covers ``length`` with that many tiles, so a 2x upscale
    of SDXL's 1024 px (256 latent cells with a 128 cell base) takes 2 tiles of 136 cells a side
    instead of 3 of 128. One tile when ``length`` already fits.
    """
    if length <= max_tile:
        return length, [0]
    if not 0 <= overlap < max_tile:
        raise ValueError("overlap must be smaller than the tile")
    count = max(2, math.ceil((length - overlap) / (max_tile - overlap)))
    tile = math.ceil((length + (count - 1) * overlap) / count)
    tile = min(length, math.ceil(tile / multiple) * multiple)
    return tile, tile_starts(length, tile, min(overlap, tile - 1))


def fewest_tiles(
    width: int, height: int, max_tile: int, overlap: int, multiple: int
) -> list[tuple[int, int, int, int]]:
    """``(left, top, right, bottom)`` boxes, row by row, all of one size: the fewest that cover."""
    tile_w, xs = fewest_tile_starts(width, max_tile, overlap, multiple)
    tile_h, ys = fewest_tile_starts(height, max_tile, overlap, multiple)
    return [(left, top, left + tile_w, top + tile_h) for top in ys for left in xs]
