"""Enlarging an image before the upscale's img2img pass: an ESRGAN-class model, or Lanczos.

``UPSCALER_MODEL`` names a super-resolution weights file (``.safetensors``, ``.pth``, ``.pt`` or
``.ckpt``: ESRGAN, Real-ESRGAN, SwinIR, HAT, DAT, OmniSR... whatever spandrel recognises). It is
loaded with spandrel's ``ModelLoader().load_from_file`` and run on the engine's device in its
dtype where the architecture supports it (float32 otherwise). Large images go through in
overlapping tiles whose seams are blended linearly, so memory stays bounded at any size. The
model runs as many times as its own scale needs to reach the factor, and the result is resized
(Lanczos, almost always down) to the exact size asked for.

Without ``UPSCALER_MODEL`` (or when it cannot be loaded) :class:`LanczosUpscaler` is used and
its ``note`` tells the member so.

spandrel imports torchvision for two architectures that are not upscalers (LaMa inpainting and
RestoreFormer face restoration). Where torchvision is not installed at all, the import goes
through a stand-in for the three names those two modules import, which raises if they ever run;
every super-resolution architecture is untouched by it.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from workers.schema import ErrorCode, WorkerError
from workers.sdxl.tiles import ramp, tile_grid

if TYPE_CHECKING:
    import torch

    from workers.settings import WorkerSettings

log = logging.getLogger(__name__)

LANCZOS_NOTE = "Upscaled with Lanczos; no AI upscaler configured."
LOAD_FAILED_NOTE = "Upscaled with Lanczos; the AI upscaler could not be loaded."
DEFAULT_TILE = 512  # input pixels per tile side: a 4x model's 2048 px output tile fits any GPU
DEFAULT_OVERLAP = 32  # input pixels shared by neighbouring tiles, blended across
MAX_PASSES = 3  # a 2x model reaches 8x in three passes; nobody asks for more
SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt")


class LanczosUpscaler:
    """Plain Lanczos resampling: what an upscale uses when no model is configured."""

    name = "lanczos"

    def __init__(self, note: str = LANCZOS_NOTE) -> None:
        self.note: str | None = note

    def upscale(self, image: Image.Image, factor: float = 2.0) -> Image.Image:
        """``image`` enlarged by ``factor`` (each side rounded to whole pixels)."""
        return self.upscale_to(image, target_size(image.size, factor))

    def upscale_to(self, image: Image.Image, size: tuple[int, int]) -> Image.Image:
        """``image`` resized to exactly ``size``."""
        return image.convert("RGB").resize(size, Image.Resampling.LANCZOS)


class ModelUpscaler:
    """A spandrel super-resolution model, run tiled on its device and dtype."""

    note: str | None = None  # the model did the work: nothing to tell the member

    def __init__(
        self,
        descriptor: Any,
        *,
        name: str,
        tile: int = DEFAULT_TILE,
        overlap: int = DEFAULT_OVERLAP,
    ) -> None:
        if tile < 16 or not 0 <= overlap < tile // 2:
            raise ValueError("tile must be at least 16 px and overlap below half of it")
        self.descriptor = descriptor
        self.name = name
        self.scale: int = descriptor.scale
        self.tile = tile
        self.overlap = overlap
        self.calls = 0  # model invocations so far (one per tile per pass)

    @property
    def device(self) -> torch.device:
        """Where the model's weights are."""
        return self.descriptor.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model runs in."""
        return self.descriptor.dtype

    def upscale(self, image: Image.Image, factor: float = 2.0) -> Image.Image:
        """``image`` enlarged by ``factor`` (each side rounded to whole pixels)."""
        return self.upscale_to(image, target_size(image.size, factor))

    def upscale_to(self, image: Image.Image, size: tuple[int, int]) -> Image.Image:
        """``image`` enlarged to exactly ``size`` through the model, then resized to fit."""
        current = image.convert("RGB")
        for _ in range(MAX_PASSES):
            if current.width >= size[0] and current.height >= size[1]:
                break
            current = self.run(current)
        return current if current.size == size else current.resize(size, Image.Resampling.LANCZOS)

    def run(self, image: Image.Image) -> Image.Image:
        """One pass of the model over ``image`` (tiled when larger than a tile): ``scale`` times larger."""
        import torch

        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
        with torch.inference_mode():
            source = pixels.permute(2, 0, 1)[None].to(device=self.device, dtype=self.dtype)
            output = self._tiled(source)
            array = output[0].permute(1, 2, 0).float().mul_(255.0).round_().clamp_(0, 255)
            return Image.fromarray(array.to(torch.uint8).cpu().numpy())

    def _call(self, tensor: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.descriptor(tensor)

    def _tiled(self, source: torch.Tensor) -> torch.Tensor:
        import torch

        _, channels, height, width = source.shape
        if max(width, height) <= self.tile:
            return self._call(source)
        scale = self.scale
        # Accumulate in float32 on the device: fp16 sums of many weighted tiles lose precision.
        total = torch.zeros((1, channels, height * scale, width * scale), device=source.device)
        weight = torch.zeros((1, 1, height * scale, width * scale), device=source.device)
        width_out = self.overlap * scale
        for left, top, right, bottom in tile_grid(width, height, self.tile, self.overlap):
            out = self._call(source[:, :, top:bottom, left:right]).float()
            box = (left * scale, top * scale, right * scale, bottom * scale)
            ramp_x = torch.tensor(ramp(box[0], box[2], width * scale, width_out), device=source.device)
            ramp_y = torch.tensor(ramp(box[1], box[3], height * scale, width_out), device=source.device)
            mix = (ramp_y[:, None] * ramp_x[None, :])[None, None]
            total[:, :, box[1] : box[3], box[0] : box[2]] += out * mix
            weight[:, :, box[1] : box[3], box[0] : box[2]] += mix
        return total / weight


Upscaler = LanczosUpscaler | ModelUpscaler


def target_size(size: tuple[int, int], factor: float) -> tuple[int, int]:
    """``size`` times ``factor``, each side rounded and at least one pixel."""
    if factor <= 0:
        raise ValueError("the upscale factor must be positive")
    return max(1, round(size[0] * factor)), max(1, round(size[1] * factor))


def load_upscaler(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
) -> ModelUpscaler:
    """Load the super-resolution model in ``path`` with spandrel onto ``device``.

    ``dtype`` (float16, bfloat16) is used where the architecture supports it, else float32.
    Raises ``WorkerError(ENGINE_UNAVAILABLE)`` with a one-line reason when the file is missing,
    not a model spandrel knows, or not an upscaler (a 1x restoration model, an inpainter).
    """
    import torch

    started = time.perf_counter()
    file = Path(path).expanduser()
    if not file.is_file():
        raise WorkerError(ErrorCode.ENGINE_UNAVAILABLE, f"The upscaler model {str(path)!r} does not exist.")
    if file.suffix.lower() not in SUFFIXES:
        raise WorkerError(
            ErrorCode.ENGINE_UNAVAILABLE,
            f"The upscaler model {file.name!r} is not a {', '.join(SUFFIXES)} weights file.",
        )
    spandrel = import_spandrel()
    try:
        descriptor = spandrel.ModelLoader(device=device).load_from_file(file)
    except Exception as exc:  # unknown architecture, corrupt file: all the same to the operator
        raise WorkerError(
            ErrorCode.ENGINE_UNAVAILABLE,
            f"The upscaler model {file.name!r} could not be loaded: {_first_line(exc)}",
        ) from exc
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.scale < 2:
        raise WorkerError(
            ErrorCode.ENGINE_UNAVAILABLE,
            f"The upscaler model {file.name!r} is a {descriptor.architecture.name} "
            f"{descriptor.purpose} model, not a super-resolution one.",
        )
    if descriptor.input_channels != 3 or descriptor.output_channels != 3:
        raise WorkerError(
            ErrorCode.ENGINE_UNAVAILABLE, f"The upscaler model {file.name!r} does not work on RGB images."
        )
    descriptor.eval()
    if dtype == torch.float16 and descriptor.supports_half:
        descriptor.half()
    elif dtype == torch.bfloat16 and descriptor.supports_bfloat16:
        descriptor.bfloat16()
    else:
        descriptor.float()
    upscaler = ModelUpscaler(descriptor, name=file.name, tile=tile, overlap=overlap)
    log.info(
        "upscaler %s (%s %dx) loaded on %s in %s in %.1fs",
        file.name,
        descriptor.architecture.name,
        descriptor.scale,
        upscaler.device,
        str(upscaler.dtype).removeprefix("torch."),
        time.perf_counter() - started,
    )
    return upscaler


def configured_upscaler(
    settings: WorkerSettings,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> Upscaler:
    """The upscaler ``UPSCALER_MODEL`` names, or Lanczos when it is unset or fails to load.

    A model that fails to load is logged as an error and upscales still work (with Lanczos and
    a note saying why), rather than every upscale failing.
    """
    if settings.upscaler_model is None:
        return LanczosUpscaler()
    try:
        return load_upscaler(
            settings.upscaler_model,
            device=device,
            dtype=dtype,
            tile=settings.upscaler_tile_px,
            # Below half a tile, as ModelUpscaler needs, for the smallest tiles the settings allow.
            overlap=min(DEFAULT_OVERLAP, settings.upscaler_tile_px // 4),
        )
    except WorkerError as exc:
        log.error("UPSCALER_MODEL unusable, upscales use Lanczos: %s", exc.message)
        return LanczosUpscaler(note=LOAD_FAILED_NOTE)


def import_spandrel() -> types.ModuleType:
    """``import spandrel``, through a torchvision stand-in where torchvision is not installed."""
    if "spandrel" in sys.modules:
        return sys.modules["spandrel"]
    try:
        if importlib.util.find_spec("torchvision") is not None:
            import spandrel
        else:
            with _torchvision_standin():
                import spandrel
    except ImportError as exc:
        raise WorkerError(
            ErrorCode.ENGINE_UNAVAILABLE,
            f"UPSCALER_MODEL needs spandrel (pip install spandrel): {_first_line(exc)}",
        ) from exc
    return spandrel


class _InterpolationMode(Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def _needs_torchvision(*_args: object, **_kwargs: object) -> Any:
    raise RuntimeError("this spandrel architecture needs torchvision, which is not installed")


@contextmanager
def _torchvision_standin() -> Iterator[None]:
    """``torchvision.transforms.functional`` as spandrel's import needs it, for the import only.

    Removed again afterwards, so anything that later asks whether torchvision is installed (as
    transformers does) still hears no.
    """
    names = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
    modules = {name: types.ModuleType(name) for name in names}
    functional = modules["torchvision.transforms.functional"]
    functional.InterpolationMode = _InterpolationMode  # type: ignore[attr-defined]
    functional.rotate = _needs_torchvision  # type: ignore[attr-defined]
    functional.normalize = _needs_torchvision  # type: ignore[attr-defined]
    modules["torchvision"].transforms = modules["torchvision.transforms"]  # type: ignore[attr-defined]
    modules["torchvision.transforms"].functional = functional  # type: ignore[attr-defined]
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name in names:
            if sys.modules.get(name) is modules[name]:
                del sys.modules[name]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 200 else line[:197] + "..."
