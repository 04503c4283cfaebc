"""Count Pillow's image encodes and full decodes, to check how often a path touches pixels."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from PIL import Image, ImageFile


@dataclass
class CodecCounts:
    """Encodes (``Image.save``) and full decodes (``ImageFile.load`` that decodes pixel data)."""

    encodes: int = 0
    decodes: int = 0


@contextmanager
def count_codec(monkeypatch: pytest.MonkeyPatch) -> Iterator[CodecCounts]:
    """Count every encode and decode in the process (all threads) while the block runs.

    Opening an image only parses its header; the pixels are decoded by ``load()``, which every
    pixel access calls. A load with tiles left to decode is a decode; a repeated load is free.
    """
    counts = CodecCounts()
    save, load = Image.Image.save, ImageFile.ImageFile.load

    def counted_save(self: Image.Image, *args: Any, **kwargs: Any) -> None:
        counts.encodes += 1
        save(self, *args, **kwargs)

    def counted_load(self: ImageFile.ImageFile) -> Any:
        if self.tile:
            counts.decodes += 1
        return load(self)

    with monkeypatch.context() as patch:
        patch.setattr(Image.Image, "save", counted_save)
        patch.setattr(ImageFile.ImageFile, "load", counted_load)
        yield counts
