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
