"""Weighted multi-prompt conditioning for SDXL, and ``--weird``.

Midjourney's ``castle::2 fog::1 people::-.5`` becomes a blend of text embeddings: each part is
encoded on its own through both SDXL text encoders, and the sequence embeddings and the pooled
embedding are summed with the parts' normalised weights. Negative-weight parts go to the
negative side, blended with the ``--no`` text by the size of their weights. Inside a part,
``(word:1.3)`` emphasis scales that word's token embeddings, then the whole sequence is
rescaled to its original mean (the Automatic1111 method, so emphasis does not change the
overall magnitude the UNet expects).

Blending the embeddings, rather than concatenating the texts, is what makes weights mean
something: ``a::3 b::1`` sits three quarters of the way towards ``a``. The library ``compel``
does the same blend, but its prompt syntax differs from Midjourney's and it would add a
dependency for some sixty lines of tensor code.

Everything here runs on the pipeline's own tokenizers and encoders, so textual inversions loaded
into the pipeline work inside parts as well.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from workers.schema import GenerationParams, PromptPart

WEIRD_SCALE = 0.15  # noise std at --weird 1000, relative to the embeddings' std


@dataclass(frozen=True)
class Conditioning:
    """The four tensors an SDXL pipeline takes instead of prompt strings."""

    prompt_embeds: torch.Tensor  # (batch, 77, hidden_1 + hidden_2)
    pooled_prompt_embeds: torch.Tensor  # (batch, projection_dim)
    negative_prompt_embeds: torch.Tensor
    negative_pooled_prompt_embeds: torch.Tensor

    def as_kwargs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for ``StableDiffusionXLPipeline.__call__`` and its img2img siblings."""
        return {
            "prompt_embeds": self.prompt_embeds,
            "pooled_prompt_embeds": self.pooled_prompt_embeds,
            "negative_prompt_embeds": self.negative_prompt_embeds,
            "negative_pooled_prompt_embeds": self.negative_pooled_prompt_embeds,
        }


def _encoders(pipe: Any) -> list[tuple[Any, Any]]:
    pairs = [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]
    return [(tokenizer, encoder) for tokenizer, encoder in pairs if encoder is not None]


def _token_ids(
    pipe: Any, tokenizer: Any, pieces: Sequence[tuple[str, float]]
) -> tuple[list[int], list[float]]:
    """CLIP input ids (start, tokens, end, padding) and one weight per position."""
    ids: list[int] = []
    weights: list[float] = []
    for text, weight in pieces:
        if hasattr(pipe, "maybe_convert_prompt"):  # expands multi-vector textual inversions
            text = pipe.maybe_convert_prompt(text, tokenizer)
        piece_ids = tokenizer(text, add_special_tokens=False, truncation=False).input_ids
        ids += piece_ids
        weights += [weight] * len(piece_ids)
    room = tokenizer.model_max_length - 2
    ids, weights = ids[:room], weights[:room]  # what does not fit is dropped, as diffusers does
    padding = room - len(ids)
    ids = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * padding
    weights = [1.0, *weights, 1.0] + [1.0] * padding
    return ids, weights


@torch.no_grad()
def _encode_one(pipe: Any, part: PromptPart) -> tuple[torch.Tensor, torch.Tensor]:
    """One text through both encoders: (1, 77, hidden) sequence and (1, dim) pooled, float32."""
    pieces = part.emphasis or ((part.text, 1.0),)
    hidden: list[torch.Tensor] = []
    pooled: torch.Tensor | None = None
    for tokenizer, encoder in _encoders(pipe):
        ids, weights = _token_ids(pipe, tokenizer, pieces)
        output = encoder(torch.tensor([ids], device=encoder.device), output_hidden_states=True)
        # SDXL conditions on the penultimate layer; only the last encoder has the pooled output.
        states = output.hidden_states[-2].float()
        if any(weight != 1.0 for weight in weights):
            scale = torch.tensor(weights, device=states.device, dtype=states.dtype)[None, :, None]
            original_mean = states.mean()
            states = states * scale
            states = states * (original_mean / states.mean())
        hidden.append(states)
        if output[0].ndim == 2:
            pooled = output[0].float()
    assert pooled is not None, "the pipeline's last text encoder gives no pooled embedding"
    return torch.cat(hidden, dim=-1), pooled


def _blend(pipe: Any, weighted: Sequence[tuple[PromptPart, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the parts' embeddings with ``weights`` normalised to add up to 1."""
    total = sum(weight for _, weight in weighted)
    sequence: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    for part, weight in weighted:
        part_sequence, part_pooled = _encode_one(pipe, part)
        share = weight / total
        sequence = part_sequence * share if sequence is None else sequence + part_sequence * share
        pooled = part_pooled * share if pooled is None else pooled + part_pooled * share
    assert sequence is not None and pooled is not None
    return sequence, pooled


def _output_dtype(pipe: Any) -> torch.dtype:
    encoder = pipe.text_encoder_2 if pipe.text_encoder_2 is not None else pipe.text_encoder
    return encoder.dtype


def encode_weighted(
    pipe: Any, parts: Sequence[PromptPart], negative: str = "", device: torch.device | str | None = None
) -> Conditioning:
    """Blend weighted ``parts`` into SDXL conditioning for ``pipe`` (any SDXL pipeline).

    Positive parts are blended by their weights; negative-weight parts and the ``negative``
    text (weight 1) make the negative side. With nothing negative, the negative embeddings are
    zeros where the pipeline is configured so (SDXL base is), else the empty prompt's. The
    result's batch size is 1; pipelines repeat it with ``num_images_per_prompt``.
    """
    positive = [(part, part.weight) for part in parts if part.weight > 0 and part.text.strip()]
    if not positive:
        positive = [(PromptPart(text=""), 1.0)]
    negatives = [(part, -part.weight) for part in parts if part.weight < 0 and part.text.strip()]
    if negative.strip():
        negatives.insert(0, (PromptPart(text=negative), 1.0))
    embeds, pooled = _blend(pipe, positive)
    if negatives:
        negative_embeds, negative_pooled = _blend(pipe, negatives)
    elif getattr(pipe.config, "force_zeros_for_empty_prompt", False):
        negative_embeds, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
    else:
        negative_embeds, negative_pooled = _blend(pipe, [(PromptPart(text=""), 1.0)])
    dtype = _output_dtype(pipe)
    target = device if device is not None else embeds.device
    return Conditioning(
        *(
            tensor.to(device=target, dtype=dtype)
            for tensor in (embeds, pooled, negative_embeds, negative_pooled)
        )
    )


def params_parts(params: GenerationParams) -> tuple[PromptPart, ...]:
    """The weighted parts of ``params``: its multi-prompt parts, else its prompt as one part."""
    return params.parts or (PromptPart(text=params.prompt),)


def encode_params(
    pipe: Any, params: GenerationParams, device: torch.device | str | None = None
) -> Conditioning:
    """:func:`encode_weighted` for a job's parameters (``--no`` included)."""
    return encode_weighted(pipe, params_parts(params), params.negative_prompt, device=device)


def apply_weird(conditioning: Conditioning, weird: int, seeds: Sequence[int]) -> Conditioning:
    """One conditioning per seed, each with its own prompt-embedding noise for ``--weird``.

    The noise is deterministic per seed (the same image always gets the same offset) and its
    size grows linearly with ``weird`` (0 to 3000): :data:`WEIRD_SCALE` times the embeddings'
    standard deviation at 1000. ``weird`` 0 only repeats the conditioning to ``len(seeds)``.
    Only the positive side moves, so ``--no`` keeps pushing away from the same things.
    """
    if not 0 <= weird <= 3000:
        raise ValueError(f"weird must be from 0 to 3000, not {weird}")
    count = len(seeds)
    base = conditioning.prompt_embeds[:1]
    pooled = conditioning.pooled_prompt_embeds[:1]
    if weird == 0:
        embeds = base.repeat(count, 1, 1)
        pooled_batch = pooled.repeat(count, 1)
    else:
        amount = WEIRD_SCALE * weird / 1000
        embeds_std = base.float().std()
        pooled_std = pooled.float().std()
        embeds_list = []
        pooled_list = []
        for seed in seeds:
            generator = torch.Generator("cpu").manual_seed(seed)
            noise = torch.randn(base.shape[1:], generator=generator, dtype=torch.float32)
            pooled_noise = torch.randn(pooled.shape[1:], generator=generator, dtype=torch.float32)
            embeds_list.append(base[0].float() + amount * embeds_std * noise.to(base.device))
            pooled_list.append(pooled[0].float() + amount * pooled_std * pooled_noise.to(pooled.device))
        embeds = torch.stack(embeds_list).to(base.dtype)
        pooled_batch = torch.stack(pooled_list).to(pooled.dtype)
    return Conditioning(
        embeds,
        pooled_batch,
        conditioning.negative_prompt_embeds[:1].repeat(count, 1, 1),
        conditioning.negative_pooled_prompt_embeds[:1].repeat(count, 1),
    )
