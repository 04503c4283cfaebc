"""The SDXL engine (diffusers) for the ``gpu`` queue.

Importing this package is cheap and touches neither torch nor CUDA: ``SDXLEngine`` and
``make_tiny_model`` are resolved on first attribute access, so the Celery parent process can
import the task module before forking and CUDA is only initialised by ``SDXLEngine.load`` in the
child. Use ``from workers.sdxl import SDXLEngine`` inside the child, or import it lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workers.sdxl.engine import SDXLEngine
    from workers.sdxl.tiny import make_tiny_model

__all__ = ["SDXLEngine", "make_tiny_model"]


def __getattr__(name: str) -> Any:
    if name == "SDXLEngine":
        from workers.sdxl.engine import SDXLEngine

        return SDXLEngine
    if name == "make_tiny_model":
        from workers.sdxl.tiny import make_tiny_model

        return make_tiny_model
    raise AttributeError(f"module 'workers.sdxl' has no attribute {name!r}")
