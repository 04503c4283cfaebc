"""What an engine hands back to its task before anything is encoded.

Engines produce pixels and facts; the task layer (``workers.results``) turns them into the
``JobResult`` message: it lays a grid out, encodes each result image exactly once and attaches the
timings. Keeping encoding out of the engines is what lets a grid be encoded once, and lets the
format be chosen in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

from workers.schema import EngineReport


@dataclass(slots=True)
class EngineOutput:
    """Images of one job, not yet encoded.

    ``images`` are RGB and share one size: four for a grid (seed, seed+1, ...), one for an
    upscale. ``phases`` are the engine's own timings in seconds (``text_encode``, ``denoise``,
    ``vae_decode``, ``postprocess``, ``api``...), summed into the result's generation time.
    ``notes`` are short, member-facing remarks about how the request was honoured.
    """

    images: list[Image.Image]
    seed: int
    report: EngineReport
    phases: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    load_s: float = 0.0
