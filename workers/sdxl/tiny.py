"""A tiny, random-weight SDXL built entirely offline, for tests and CPU smoke runs.

The layout matches a real SDXL checkpoint folder (``model_index.json``, ``unet/``, ``vae/``,
``text_encoder/``, ``text_encoder_2/``, two tokenizers, ``scheduler/``), so the engine loads it
through exactly the same ``StableDiffusionXLPipeline.from_pretrained`` call as the real model.
Only the sizes differ: the UNet samples 32x32 latents and the VAE scales by 2, so the model's
native resolution is 64 px and the aspect buckets shrink with it.

The tokenizer is written here too (a byte-level BPE vocabulary of the 256 byte symbols, their
end-of-word forms, a few merges and CLIP's two special tokens), because nothing may come from
the Hugging Face hub.
"""

from __future__ import annotations

import json
from pathlib import Path

TINY_SEED = 0
TINY_SAMPLE_SIZE = 32  # latent side; x VAE scale factor 2 = 64 px native resolution
TEXT_HIDDEN = 32
TIME_EMBED_DIM = 8
MAX_TOKENS = 77  # CLIP's context length; the pipelines pad every prompt to it
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"

# A few merges so the tokenizer really is BPE (common English pairs); the rest stays per byte.
_MERGES = ("t h", "th e</w>", "a n", "an d</w>", "o f</w>", "i n", "e r", "a t</w>", "o n", "e n")


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes, in byte order.

    Printable Latin-1 bytes stand for themselves; the others (controls, space, ...) are moved
    up past 255 so every byte has a visible, non-whitespace symbol.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def write_tiny_tokenizer(path: Path) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and a config for a tiny CLIP tokenizer into ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    tokens = [*symbols, *(s + "</w>" for s in symbols)]
    tokens += ["".join(merge.split(" ")) for merge in _MERGES]
    tokens += [BOS, EOS]
    vocab = {token: index for index, token in enumerate(tokens)}
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_TOKENS,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


def make_tiny_model(path: Path) -> Path:
    """Build a tiny random-weight SDXL and save it to ``path`` with ``save_pretrained``.

    Deterministic: the weights come from a fixed seed (without disturbing the caller's global
    RNG), so two calls write identical tensors. Returns ``path``.
    """
    # Heavy imports stay inside: importing workers.sdxl must not pull in torch (or CUDA).
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = write_tiny_tokenizer(path / "_tokenizer_src")
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    vocab_size = len(tokenizer)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        unet = UNet2DConditionModel(
            sample_size=TINY_SAMPLE_SIZE,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2),
            use_linear_projection=True,
            cross_attention_dim=2 * TEXT_HIDDEN,  # both encoders' hidden states, concatenated
            addition_embed_type="text_time",
            addition_time_embed_dim=TIME_EMBED_DIM,
            # six micro-conditioning numbers (original size, crop, target size) + pooled text
            projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TEXT_HIDDEN,
            norm_num_groups=1,
        )
        vae = AutoencoderKL(
            sample_size=2 * TINY_SAMPLE_SIZE,
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            scaling_factor=0.13025,  # SDXL's VAE scaling, so latent statistics match the real code path
        )
        text_config = CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=TEXT_HIDDEN,
            intermediate_size=37,
            num_hidden_layers=5,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            projection_dim=TEXT_HIDDEN,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        text_encoder = CLIPTextModel(text_config)
        text_encoder_2 = CLIPTextModelWithProjection(text_config)

    # SDXL base's own scheduler settings; the engine derives every sampler from this config.
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        prediction_type="epsilon",
        use_karras_sigmas=False,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.save_pretrained(str(path), safe_serialization=True)
    for leftover in tokenizer_dir.iterdir():
        leftover.unlink()
    tokenizer_dir.rmdir()
    return path
