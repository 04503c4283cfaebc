"""The image safety classifier run on SDXL results, so the bot can post, spoiler or block them.

``SAFETY_MODEL`` names any transformers image classifier (a local folder saved with
``save_pretrained`` or a hub id), for example an NSFW ViT with the labels ``normal`` / ``nsfw``. It
is loaded with ``AutoImageProcessor`` and ``AutoModelForImageClassification`` and scores every
generated image (each tile of a grid) in one batch. A verdict's ``score`` is the probability of
the unsafe labels (``SAFETY_UNSAFE_LABELS``, matched case-insensitively): their sum for a
single-label classifier (softmax), the largest for a multi-label one (sigmoid). The image is
flagged when that reaches ``SAFETY_THRESHOLD``.

The worker only reports (``JobResult.safety``); what happens to a flagged image depends on the
channel and is decided by the bot (``bot.content_rules``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from workers.schema import ErrorCode, SafetyVerdict, WorkerError

if TYPE_CHECKING:
    import torch

    from workers.settings import WorkerSettings

log = logging.getLogger(__name__)

# Label names NSFW classifiers commonly use for what a public channel should not show.
DEFAULT_UNSAFE_LABELS = ("nsfw", "porn", "hentai", "explicit", "unsafe")
DEFAULT_THRESHOLD = 0.5


def parse_labels(value: str | Iterable[str]) -> frozenset[str]:
    """Unsafe label names from a comma-separated setting or a list, case-folded."""
    parts = value.split(",") if isinstance(value, str) else value
    return frozenset(part.strip().casefold() for part in parts if part.strip())


class SafetyChecker:
    """A loaded image classifier and the rule that turns its scores into verdicts."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        unsafe_labels: Iterable[str] = DEFAULT_UNSAFE_LABELS,
        name: str = "",
    ) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be within 0..1, not {threshold}")
        self.model = model.eval()
        self.processor = processor
        self.threshold = threshold
        self.name = name
        id2label: dict[int, str] = {int(k): str(v) for k, v in model.config.id2label.items()}
        self.labels = [id2label[index] for index in range(len(id2label))]
        wanted = parse_labels(unsafe_labels)
        self.unsafe_indices = [index for index, label in enumerate(self.labels) if label.casefold() in wanted]
        if not self.unsafe_indices:
            # A classifier none of whose labels counts as unsafe would pass everything silently.
            raise WorkerError(
                ErrorCode.ENGINE_UNAVAILABLE,
                f"The safety classifier's labels {self.labels} include none of the unsafe labels "
                f"{sorted(wanted)}; set SAFETY_UNSAFE_LABELS.",
            )
        self.multi_label = getattr(model.config, "problem_type", None) == "multi_label_classification"

    @classmethod
    def load(
        cls,
        source: str | Path,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        unsafe_labels: Iterable[str] = DEFAULT_UNSAFE_LABELS,
        device: str | torch.device = "cpu",
    ) -> SafetyChecker:
        """Load the classifier at ``source`` (folder or hub id) onto ``device``, in float32.

        float32 because the classifier is small beside SDXL and its scores are compared with a
        threshold. Any load failure raises ``WorkerError(ENGINE_UNAVAILABLE)`` with one line.
        """
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        started = time.perf_counter()
        name = str(source)
        local = Path(name).expanduser()
        if local.is_dir():
            name = str(local)
        from celery.exceptions import SoftTimeLimitExceeded

        try:
            processor = AutoImageProcessor.from_pretrained(name)
            model = AutoModelForImageClassification.from_pretrained(name)
        except SoftTimeLimitExceeded:  # the job ran out of time: a TIMEOUT, not a broken classifier
            raise
        except Exception as exc:  # every load failure means the same to the operator
            raise WorkerError(
                ErrorCode.ENGINE_UNAVAILABLE,
                f"The safety classifier {name!r} could not be loaded: {_first_line(exc)}",
            ) from exc
        model.to(device=device)
        checker = cls(model, processor, threshold=threshold, unsafe_labels=unsafe_labels, name=name)
        log.info(
            "safety classifier %s loaded on %s in %.1fs (labels %s, unsafe %s, threshold %.2f)",
            name,
            device,
            time.perf_counter() - started,
            checker.labels,
            [checker.labels[i] for i in checker.unsafe_indices],
            threshold,
        )
        return checker

    @classmethod
    def from_settings(
        cls, settings: WorkerSettings, *, device: str | torch.device = "cpu"
    ) -> SafetyChecker | None:
        """The checker ``SAFETY_MODEL`` names, or ``None`` when no classifier is configured."""
        if not settings.safety_model:
            return None
        return cls.load(
            settings.safety_model,
            threshold=settings.safety_threshold,
            unsafe_labels=parse_labels(settings.safety_unsafe_labels),
            device=device,
        )

    @property
    def device(self) -> torch.device:
        """Where the classifier's weights are."""
        return next(self.model.parameters()).device

    def classify(self, images: Sequence[Image.Image]) -> list[SafetyVerdict]:
        """One verdict per image, in order, from one batched forward pass."""
        if not images:
            return []
        import torch

        inputs = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        pixels = inputs["pixel_values"].to(device=self.device, dtype=next(self.model.parameters()).dtype)
        with torch.inference_mode():
            logits = self.model(pixel_values=pixels).logits.float()
        if self.multi_label:
            probs = torch.sigmoid(logits)
            scores = probs[:, self.unsafe_indices].max(dim=1).values
        else:
            probs = torch.softmax(logits, dim=1)
            scores = probs[:, self.unsafe_indices].sum(dim=1)
        top = probs.argmax(dim=1)
        verdicts = []
        for index, score in zip(top.tolist(), scores.clamp(0.0, 1.0).tolist(), strict=True):
            verdicts.append(
                SafetyVerdict(label=self.labels[index], score=score, unsafe=score >= self.threshold)
            )
        return verdicts


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 200 else line[:197] + "..."
