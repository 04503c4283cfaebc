"""A tiny image safety classifier built offline, for tests and CPU smoke runs.

It is a real ``ViTForImageClassification`` (one layer, 32 px input, 8 px patches) with a real
``ViTImageProcessor`` config, saved with ``save_pretrained``, so :class:`workers.safety.SafetyChecker`
loads it through exactly the code that loads a hub classifier. With ``probabilities`` the final
layer's weights are zeroed and its bias set to their logarithms, so every image gets exactly
those class probabilities: tests can pin which label wins and by how much.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

TINY_SAFETY_SEED = 0
TINY_SAFETY_SIZE = 32
TINY_SAFETY_LABELS = ("normal", "nsfw")


def make_tiny_safety_classifier(
    path: Path,
    *,
    labels: Sequence[str] = TINY_SAFETY_LABELS,
    probabilities: Mapping[str, float] | None = None,
    multi_label: bool = False,
) -> Path:
    """Write a tiny ViT image classifier with ``labels`` and its image processor to ``path``.

    ``probabilities`` (label -> probability, every label given, each above 0) fixes the output
    for any image; without it the weights stay random (seeded, so two calls write the same
    tensors). With ``multi_label`` the config says ``multi_label_classification`` and each
    probability is read through a sigmoid instead of a softmax. Returns ``path``.
    """
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = ViTConfig(
        image_size=TINY_SAFETY_SIZE,
        patch_size=8,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: index for index, label in enumerate(labels)},
        problem_type="multi_label_classification" if multi_label else "single_label_classification",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SAFETY_SEED)
        model = ViTForImageClassification(config)
    if probabilities is not None:
        if set(probabilities) != set(labels) or min(probabilities.values()) <= 0:
            raise ValueError("probabilities must give every label a value above 0")
        bias = [_logit(probabilities[label], multi_label) for label in labels]
        with torch.no_grad():
            model.classifier.weight.zero_()
            model.classifier.bias.copy_(torch.tensor(bias))
    model.save_pretrained(path)
    processor = ViTImageProcessor(size={"height": TINY_SAFETY_SIZE, "width": TINY_SAFETY_SIZE})
    processor.save_pretrained(path)
    return path


def _logit(probability: float, multi_label: bool) -> float:
    # Softmax of log-probabilities gives them back exactly; a sigmoid needs the log-odds.
    if multi_label:
        return math.log(probability / (1 - probability))
    return math.log(probability)
