"""How long the worker takes to encode a result grid, per lossless encoder, and how big it gets.

A grid is four 1024x1024 SDXL images composed into one 2048x2048 RGB image, which the worker
encodes exactly once (``workers.results``). This script times candidate lossless encoders on
such a grid and prints each one's time and size next to the current baseline (PNG,
``compress_level=6``) measured in the same run, plus the decode time the bot pays to cut a U#
tile out of it.

There are no real SDXL outputs in this repository and no network, so the images are built
procedurally to look like photographs to a compressor: smooth multi-colour gradients, large
blurred shapes (the soft out-of-focus masses of a typical render), a few sharper edges and mild
per-pixel noise (SDXL's VAE leaves fine grain everywhere, which is what makes its PNGs big).
Real renders have more fine texture than this, so absolute sizes are on the low side; the
ranking of the encoders is what the default is chosen from.

    python bench/bench_encode.py --runs 5
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, features

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.imaging import compose_grid, encode_image
from workers.schema import ImageFormat

TILE = 1024


def photo_like(seed: int, size: int = TILE, noise: float = 2.5) -> Image.Image:
    """A deterministic, natural-looking RGB image: gradients, blurred shapes, edges, mild noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    corners = rng.uniform(20, 235, size=(4, 3)).astype(np.float32)
    top = corners[0] * (1 - x[..., None]) + corners[1] * x[..., None]
    bottom = corners[2] * (1 - x[..., None]) + corners[3] * x[..., None]
    base = top * (1 - y[..., None]) + bottom * y[..., None]
    image = Image.fromarray(base.clip(0, 255).astype(np.uint8), "RGB")

    shapes = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(shapes)
    for _ in range(24):
        cx, cy = rng.uniform(0, size, 2)
        rx, ry = rng.uniform(size * 0.04, size * 0.3, 2)
        colour = (*(int(c) for c in rng.integers(0, 256, 3)), int(rng.integers(90, 220)))
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=colour)
    image = Image.alpha_composite(image.convert("RGBA"), shapes.filter(ImageFilter.GaussianBlur(18)))

    edges = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(edges)
    for _ in range(10):
        x0, y0, x1, y1 = rng.uniform(0, size, 4)
        colour = (*(int(c) for c in rng.integers(0, 256, 3)), 160)
        draw.rectangle((min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)), fill=colour)
    image = Image.alpha_composite(image, edges.filter(ImageFilter.GaussianBlur(2))).convert("RGB")

    pixels = np.asarray(image, dtype=np.float32)
    pixels += rng.normal(0.0, noise, size=pixels.shape).astype(np.float32)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")


@dataclass
class Encoder:
    """One candidate: a name and a function from an image to file bytes."""

    name: str
    encode: Callable[[Image.Image], bytes]


def _save(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, **options)
    return buffer.getvalue()


def _worker(image_format: ImageFormat, level: int) -> Callable[[Image.Image], bytes]:
    """The worker's own encoder at one compress level, exactly as ``workers.results`` calls it."""
    return lambda image: encode_image(image, image_format, level)


ENCODERS = [
    Encoder("png level 6 (baseline)", lambda im: _save(im, format="PNG", compress_level=6)),
    Encoder("png level 3", _worker(ImageFormat.PNG, 3)),
    Encoder("png level 1", _worker(ImageFormat.PNG, 1)),
    Encoder("webp lossless level 0 (m0 q0)", _worker(ImageFormat.WEBP, 0)),
    Encoder("webp lossless level 1 (m1 q20)", _worker(ImageFormat.WEBP, 1)),
    Encoder("webp lossless level 2 (m2 q25)", _worker(ImageFormat.WEBP, 2)),
    Encoder("webp lossless level 6 (m4 q75)", _worker(ImageFormat.WEBP, 6)),
]


def _timed(function: Callable[[], object], runs: int) -> tuple[float, object]:
    times = []
    value: object = None
    for _ in range(runs):
        started = time.perf_counter()
        value = function()
        times.append(time.perf_counter() - started)
    return statistics.median(times), value


def _decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.convert("RGB")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per encoder (median)")
    parser.add_argument("--tile", type=int, default=TILE, help="side of each of the four images")
    parser.add_argument("--noise", type=float, default=2.5, help="per-pixel grain (standard deviation)")
    args = parser.parse_args(argv)

    tiles = [photo_like(seed, args.tile, args.noise) for seed in range(4)]
    grid = compose_grid(tiles)
    reference = np.asarray(grid)
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, Pillow {Image.__version__}, zlib-ng "
        f"{features.version('zlib_ng') or '-'}, libwebp {features.version('webp')}"
    )
    print(f"# grid {grid.width}x{grid.height}, grain {args.noise:g}, median of {args.runs} runs\n")

    # What the worker did before: each engine encoded its four tiles as separate PNG files
    # (level 6), and the bot decoded them to compose the grid and encoded that again.
    before_s, _ = _timed(lambda: [_save(t, format="PNG", compress_level=6) for t in tiles], args.runs)
    with ThreadPoolExecutor(4) as pool:
        before_pool_s, _ = _timed(
            lambda: list(pool.map(lambda t: _save(t, format="PNG", compress_level=6), tiles)), args.runs
        )
    print(f"before: 4 tiles x PNG level 6 on the worker: {before_s:.3f} s", end="")
    print(f" (4 threads: {before_pool_s:.3f} s)\n")

    print("| encoder | encode s | size MB | time vs baseline | size vs baseline | decode s | lossless |")
    print("|---|---|---|---|---|---|---|")
    baseline: tuple[float, int] | None = None
    for encoder in ENCODERS:
        encode_s, data = _timed(lambda e=encoder: e.encode(grid), args.runs)
        assert isinstance(data, bytes)
        decode_s, decoded = _timed(lambda d=data: _decode(d), args.runs)
        assert isinstance(decoded, Image.Image)
        lossless = bool(np.array_equal(np.asarray(decoded), reference))
        if baseline is None:
            baseline = (encode_s, len(data))
        print(
            f"| {encoder.name} | {encode_s:.3f} | {len(data) / 1e6:.2f} | {encode_s / baseline[0]:.2f}x "
            f"| {len(data) / baseline[1]:.2f}x | {decode_s:.3f} | {'yes' if lossless else 'NO'} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
