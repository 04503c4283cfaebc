"""Tiny random-weight image-input models, built offline for tests and CPU smoke runs.

Beside the tiny SDXL (:mod:`workers.sdxl.tiny`), image inputs need two more models, each written
in the layout its real counterpart ships in so the production loading code reads them unchanged:

- an IP-Adapter folder like ``h94/IP-Adapter``: ``sdxl_models/ip-adapter_tiny.safetensors``
  (``image_proj.*`` and ``ip_adapter.*`` tensors sized for the tiny UNet's cross-attention) and
  ``sdxl_models/image_encoder/`` (a tiny ``CLIPVisionModelWithProjection``);
- a captioning model folder like ``Salesforce/blip-image-captioning-base``: a tiny BLIP with a
  locally written WordPiece vocabulary and its processor config.

Nothing comes from the Hugging Face hub. Weights come from fixed seeds without disturbing the
caller's global RNG, so two builds write identical tensors.
"""

from __future__ import annotations

from pathlib import Path

TINY_IP_SUBFOLDER = "sdxl_models"
TINY_IP_WEIGHT_NAME = "ip-adapter_tiny.safetensors"
TINY_IMAGE_EMBED_DIM = 32  # the image encoder's projection size = the adapter's input size
TINY_IMAGE_SIZE = 32  # the image encoder's input side, in pixels
IP_TOKENS = 4  # a plain IP-Adapter turns one image into four extra cross-attention tokens
TINY_IP_SEED = 1
TINY_CAPTION_SEED = 2

# A small English vocabulary so random captions read like (nonsense) prompts, not byte soup.
_CAPTION_WORDS = (
    "a an the of in on with and at by under over near a photo painting drawing portrait "
    "cat dog fox bird horse woman man child girl boy robot castle city street forest river "
    "mountain lake sea beach sky cloud sunset night moon star tree flower garden house room "
    "window car boat train red blue green yellow black white golden silver old young small "
    "large tall dark bright soft misty snowy rainy sunny sitting standing walking flying "
    "running lying looking wearing holding hat coat dress glasses book cup table chair "
    "field road bridge tower wall door light shadow reflection water fire snow ice"
).split()


def make_tiny_ip_adapter(path: Path, model_dir: Path) -> Path:
    """Write a tiny random IP-Adapter for the tiny SDXL in ``model_dir`` into ``path``.

    The adapter's shapes follow the UNet's config: one ``to_k_ip`` / ``to_v_ip`` pair per
    cross-attention layer, numbered the way diffusers numbers the original checkpoints (every
    attention processor counts, cross-attention ones are the odd numbers), and an image
    projection from the encoder's embedding to four tokens of the cross-attention width.
    Returns ``path``; load it with ``IP_ADAPTER_MODEL=path``, ``IP_ADAPTER_SUBFOLDER=sdxl_models``,
    ``IP_ADAPTER_WEIGHT_NAME=ip-adapter_tiny.safetensors``.
    """
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    path = Path(path)
    folder = path / TINY_IP_SUBFOLDER
    folder.mkdir(parents=True, exist_ok=True)
    config = UNet2DConditionModel.load_config(str(Path(model_dir) / "unet"))
    cross = int(config["cross_attention_dim"])
    channels = list(config["block_out_channels"])

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_IP_SEED)
        with torch.device("meta"):
            # Only the processor names are needed; a meta UNet costs no memory or init time.
            unet = UNet2DConditionModel.from_config(config)
        tensors: dict[str, torch.Tensor] = {}
        proj = torch.nn.Linear(TINY_IMAGE_EMBED_DIM, IP_TOKENS * cross)
        norm = torch.nn.LayerNorm(cross)
        tensors["image_proj.proj.weight"] = proj.weight.detach()
        tensors["image_proj.proj.bias"] = proj.bias.detach()
        tensors["image_proj.norm.weight"] = norm.weight.detach()
        tensors["image_proj.norm.bias"] = norm.bias.detach()
        key_id = 1
        for name in unet.attn_processors:
            if name.endswith("attn1.processor"):
                continue  # self-attention: no image tokens, but its number is still skipped
            hidden = _hidden_size(name, channels)
            for kind in ("to_k_ip", "to_v_ip"):
                linear = torch.nn.Linear(cross, hidden, bias=False)
                tensors[f"ip_adapter.{key_id}.{kind}.weight"] = linear.weight.detach()
            key_id += 2
        encoder_config = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            projection_dim=TINY_IMAGE_EMBED_DIM,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=TINY_IMAGE_SIZE,
            patch_size=4,
            num_channels=3,
        )
        encoder = CLIPVisionModelWithProjection(encoder_config)
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(folder / TINY_IP_WEIGHT_NAME))
    encoder.save_pretrained(str(folder / "image_encoder"), safe_serialization=True)
    return path


def _hidden_size(processor_name: str, channels: list[int]) -> int:
    """The width of the UNet block an attention processor sits in (diffusers' own rule)."""
    if processor_name.startswith("mid_block"):
        return channels[-1]
    block = int(processor_name.split(".")[1])
    if processor_name.startswith("up_blocks"):
        return list(reversed(channels))[block]
    return channels[block]


def write_tiny_wordpiece_vocab(path: Path) -> Path:
    """Write a BERT-style ``vocab.txt`` (special tokens, letters, a few words) into ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces = ["##" + letter for letter in letters]
    words = list(dict.fromkeys(_CAPTION_WORDS))
    punctuation = [",", ".", "-", "'"]
    vocab = [*special, *punctuation, *letters, *pieces, *words]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return path


def make_tiny_captioner(path: Path) -> Path:
    """Build a tiny random BLIP captioning model with its processor and save it to ``path``.

    The folder has the layout of ``Salesforce/blip-image-captioning-base`` (model config and
    safetensors, ``preprocessor_config.json``, tokenizer files), so ``workers.describe`` loads
    it with the same Auto classes as the real one. Returns ``path``.
    """
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab_dir = write_tiny_wordpiece_vocab(path / "_vocab_src")
    tokenizer = BertTokenizer(str(vocab_dir / "vocab.txt"), do_lower_case=True, bos_token="[DEC]")
    image_processor = BlipImageProcessor(
        size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)

    vocab_size = len(tokenizer)
    config = BlipConfig(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": TINY_IMAGE_SIZE,
            "patch_size": 8,
        },
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "encoder_hidden_size": 32,
            "max_position_embeddings": 64,
            "bos_token_id": tokenizer.convert_tokens_to_ids("[DEC]"),
            "pad_token_id": tokenizer.pad_token_id,
            "sep_token_id": tokenizer.sep_token_id,
            "eos_token_id": tokenizer.sep_token_id,
        },
        projection_dim=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_CAPTION_SEED)
        model = BlipForConditionalGeneration(config)
    model.save_pretrained(str(path), safe_serialization=True)
    processor.save_pretrained(str(path))
    for leftover in vocab_dir.iterdir():
        leftover.unlink()
    vocab_dir.rmdir()
    return path
