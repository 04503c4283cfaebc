"""Draft mode's UNet: reuse the deep features of the previous full step (DeepCache-style).

Between neighbouring denoising steps the UNet's deep, low-resolution features barely change; its
shallow, full-resolution blocks carry the step-to-step detail. So on every ``interval``-th step
the whole UNet runs and the input of its last up block (everything the deep part computed) is
kept; on the steps between, only the shallow path runs: the embeddings, ``conv_in``, the first
down block (for its skip connections), the last up block on the kept features, and the output
convolution. For SDXL that skips about four fifths of the UNet's work on those steps.

:class:`DeepCacheUNet` stands in for the pipeline's ``unet`` for one call (:func:`deep_cache`);
everything but the call itself is forwarded to the real UNet. It runs the UNet's own blocks,
eagerly, so it works with any diffusers ``UNet2DConditionModel`` of SDXL's layout (no ControlNet
or adapter residuals).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

DRAFT_INTERVAL = 2  # a full UNet evaluation every other step
DRAFT_MIN_STEPS = 8


def draft_steps(steps: int) -> int:
    """Steps for a draft of a ``steps``-step job: half, but at least 8 (never more than asked)."""
    return min(steps, max(DRAFT_MIN_STEPS, (steps + 1) // 2))


class DeepCacheUNet:
    """Calls like the UNet; computes the deep part only on every ``interval``-th call."""

    def __init__(self, unet: Any, interval: int = DRAFT_INTERVAL) -> None:
        """Wrap ``unet`` for one pipeline call."""
        if interval < 1:
            raise ValueError("interval must be at least 1")
        self.unet = unet
        self.interval = interval
        self.calls = 0
        self.full_evaluations = 0
        self.shallow_evaluations = 0
        self._cached: torch.Tensor | None = None

    def __getattr__(self, name: str) -> Any:
        # config, dtype, add_embedding...: the pipelines read them off their unet.
        return getattr(self.unet, name)

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        timestep_cond: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        return_dict: bool = True,
        **unsupported: Any,
    ) -> Any:
        """One denoising evaluation, full or shallow; returns what the UNet would."""
        if any(value is not None for value in unsupported.values()):
            raise ValueError(f"draft mode does not support {sorted(unsupported)}")
        stale = self._cached is None or self._cached.shape[0] != sample.shape[0]
        full = stale or self.calls % self.interval == 0
        self.calls += 1
        out = self._forward(
            sample,
            timestep,
            encoder_hidden_states,
            timestep_cond,
            cross_attention_kwargs,
            added_cond_kwargs,
            full,
        )
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)

    def _forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        timestep_cond: torch.Tensor | None,
        cross_attention_kwargs: dict[str, Any] | None,
        added_cond_kwargs: dict[str, torch.Tensor] | None,
        full: bool,
    ) -> torch.Tensor:
        unet = self.unet
        upsample_size = None
        factor = 2**unet.num_upsamplers
        forward_upsample_size = any(dim % factor != 0 for dim in sample.shape[-2:])
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
        aug = unet.get_aug_embed(
            emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs or {}
        )
        if aug is not None:
            emb = emb + aug
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        context = unet.process_encoder_hidden_states(
            encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs or {}
        )
        cross = {"encoder_hidden_states": context, "cross_attention_kwargs": cross_attention_kwargs}

        def down(block: Any, hidden: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
            if getattr(block, "has_cross_attention", False):
                return block(hidden_states=hidden, temb=emb, **cross)
            return block(hidden_states=hidden, temb=emb)

        def up(block: Any, hidden: torch.Tensor, res: tuple[torch.Tensor, ...], size: Any) -> torch.Tensor:
            if getattr(block, "has_cross_attention", False):
                return block(
                    hidden_states=hidden, temb=emb, res_hidden_states_tuple=res, upsample_size=size, **cross
                )
            return block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=res, upsample_size=size)

        hidden = unet.conv_in(sample)
        residuals: tuple[torch.Tensor, ...] = (hidden,)
        last = unet.up_blocks[-1]
        if full:
            self.full_evaluations += 1
            for block in unet.down_blocks:
                hidden, res = down(block, hidden)
                residuals += res
            if unet.mid_block is not None:
                if getattr(unet.mid_block, "has_cross_attention", False):
                    hidden = unet.mid_block(
                        hidden,
                        emb,
                        encoder_hidden_states=context,
                        cross_attention_kwargs=cross_attention_kwargs,
                    )
                else:
                    hidden = unet.mid_block(hidden, emb)
            for block in unet.up_blocks[:-1]:
                res = residuals[-len(block.resnets) :]
                residuals = residuals[: -len(block.resnets)]
                if forward_upsample_size:
                    upsample_size = residuals[-1].shape[2:]
                hidden = up(block, hidden, res, upsample_size)
            self._cached = hidden
        else:
            self.shallow_evaluations += 1
            assert self._cached is not None
            # Only the skip connections of the first down block feed the last up block.
            _, res = down(unet.down_blocks[0], hidden)
            residuals += res
            residuals = residuals[: len(last.resnets)]
            hidden = self._cached
        hidden = up(last, hidden, residuals[-len(last.resnets) :], None)
        if unet.conv_norm_out is not None:
            hidden = unet.conv_act(unet.conv_norm_out(hidden))
        return unet.conv_out(hidden)


@contextmanager
def deep_cache(pipe: Any, interval: int = DRAFT_INTERVAL) -> Iterator[DeepCacheUNet]:
    """Within the block, ``pipe`` denoises with a :class:`DeepCacheUNet` around its own UNet."""
    unet = pipe.unet
    wrapper = DeepCacheUNet(unet, interval)
    # object.__setattr__: the pipeline's own __setattr__ would record the swap in its config.
    object.__setattr__(pipe, "unet", wrapper)
    try:
        yield wrapper
    finally:
        object.__setattr__(pipe, "unet", unet)
