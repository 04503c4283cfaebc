"""Prompt-side syntax the SDXL engine understands beyond plain text: LoRA tags.

A LoRA from ``LORAS_DIR`` is switched on by writing ``<lora:NAME>`` or ``<lora:NAME:WEIGHT>``
anywhere in the prompt (the Automatic1111 convention most SDXL users know). ``NAME`` is the
file's name without ``.safetensors``; ``WEIGHT`` defaults to 1.0 and may be negative. The tags
are removed from the text before it reaches the text encoders. Textual-inversion embeddings need
no syntax: their token (the file name without extension) is simply written in the prompt.
"""

from __future__ import annotations

import re

from workers.schema import ErrorCode, WorkerError

LORA_TAG = re.compile(r"<lora:([^:<>]+?)(?::\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+)))?\s*>", re.IGNORECASE)
MAX_LORA_WEIGHT = 4.0


def parse_lora_tags(prompt: str) -> tuple[str, dict[str, float]]:
    """Split ``prompt`` into the text for the encoders and ``{lora name: weight}``.

    A repeated name keeps its last weight. Weights outside ±4 are refused as ``BAD_INPUT``:
    they only ever produce noise, and the member should hear why.
    """
    loras: dict[str, float] = {}

    def take(match: re.Match[str]) -> str:
        weight = float(match.group(2)) if match.group(2) else 1.0
        if abs(weight) > MAX_LORA_WEIGHT:
            raise WorkerError(
                ErrorCode.BAD_INPUT,
                f"LoRA weight {weight:g} for {match.group(1).strip()!r} is out of range "
                f"(-{MAX_LORA_WEIGHT:g} to {MAX_LORA_WEIGHT:g}).",
            )
        loras[match.group(1).strip()] = weight
        return " "

    text = LORA_TAG.sub(take, prompt)
    # Only tidy what removing tags left behind; spacing elsewhere is the member's.
    text = re.sub(r" {2,}", " ", text).strip().strip(",").strip()
    return text, loras
