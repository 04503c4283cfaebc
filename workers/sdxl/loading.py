"""Loading SDXL for the engine: device and dtype, weights, embeddings, LoRAs and GPU speed levers.

Everything here runs inside the worker's child process (Celery prefork), never at import time,
so CUDA is initialised after the fork as it must be.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path
from typing import Any, get_args

import torch

from workers.schema import ErrorCode, WorkerError
from workers.settings import CompileScope, WorkerSettings

log = logging.getLogger(__name__)

EMBEDDING_SUFFIXES = (".safetensors", ".bin", ".pt")
_DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


def dtype_kwarg() -> str:
    """``from_pretrained``'s dtype keyword: ``dtype`` on new diffusers, ``torch_dtype`` before."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def resolve_device(settings: WorkerSettings, *, what: str = "SDXL") -> tuple[torch.device, torch.dtype]:
    """The device and weight dtype to run on: ``auto`` picks CUDA in fp16, else MPS, else CPU in fp32.

    The choice is logged at INFO for ``what``; ``DEVICE=auto`` ending on the CPU is logged at
    WARNING, since on a GPU machine it means the driver or the CUDA build of torch is missing
    and every job will take minutes.
    """
    name = settings.device.strip().lower()
    auto = name == "auto"
    if auto:
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
            log.warning(
                "DEVICE=auto found no CUDA or MPS device (torch %s, CUDA build %s): %s runs on the "
                "CPU, which is very slow; set DEVICE=cpu to make that explicit",
                torch.__version__,
                torch.version.cuda or "none",
                what,
            )
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise WorkerError(ErrorCode.ENGINE_UNAVAILABLE, f"Unknown device {settings.device!r}.") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise WorkerError(ErrorCode.ENGINE_UNAVAILABLE, "DEVICE is cuda but no CUDA GPU is available.")
    dtype_name = settings.dtype.strip().lower()
    if dtype_name == "auto":
        # fp16 is what SDXL checkpoints ship as; CPUs are slow or unsupported in half precision.
        dtype = torch.float16 if device.type in ("cuda", "mps") else torch.float32
    elif dtype_name in _DTYPES:
        dtype = _DTYPES[dtype_name]
    else:
        raise WorkerError(
            ErrorCode.ENGINE_UNAVAILABLE,
            f"Unknown dtype {settings.dtype!r} (auto, float16, bfloat16, float32).",
        )
    log.info(
        "%s runs on %s%s in %s (DEVICE=%s, DTYPE=%s)",
        what,
        device,
        f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "",
        str(dtype).removeprefix("torch."),
        settings.device,
        settings.dtype,
    )
    return device, dtype


def _short(exc: BaseException) -> str:
    """One line of an exception for a member-safe message (no traceback, bounded length)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def from_pretrained(
    cls: Any, source: str, *, dtype: torch.dtype, gpu: bool, what: str, **components: Any
) -> Any:
    """``cls.from_pretrained(source)`` for a hub id or a local diffusers folder, with clean failures.

    Prefers safetensors wherever they exist and the ``fp16`` weight variant on a GPU in half
    precision (half the download and load time). Anything that stops the load becomes
    ``WorkerError(ENGINE_UNAVAILABLE)`` with a one-line reason.
    """
    kwargs: dict[str, Any] = {dtype_kwarg(): dtype, **components}
    half = gpu and dtype in (torch.float16, torch.bfloat16)
    local = Path(source).expanduser()
    variants: list[str | None]
    if local.is_file():
        raise WorkerError(
            ErrorCode.ENGINE_UNAVAILABLE,
            f"{what} {source!r} is a single file; point it to a diffusers folder or a hub id instead.",
        )
    if local.is_dir():
        source = str(local)
        kwargs["use_safetensors"] = any(local.rglob("*.safetensors"))
        variants = ["fp16" if half and any(local.rglob("*.fp16.*")) else None]
    elif local.is_absolute() or source.startswith((".", "~")) or source.count("/") > 1:
        raise WorkerError(ErrorCode.ENGINE_UNAVAILABLE, f"{what} folder {source!r} does not exist.")
    else:
        # Hub id: None lets diffusers take safetensors when the repo has them, .bin otherwise.
        kwargs["use_safetensors"] = None
        variants = ["fp16", None] if half else [None]
    last: Exception | None = None
    for variant in variants:
        try:
            return cls.from_pretrained(source, variant=variant, **kwargs)
        except Exception as exc:  # every load failure means the same to the member
            last = exc
            log.info("loading %s %s (variant %s) failed: %s", what, source, variant, _short(exc))
    assert last is not None
    raise WorkerError(
        ErrorCode.ENGINE_UNAVAILABLE, f"{what} {source!r} could not be loaded: {_short(last)}"
    ) from last


def load_embeddings(pipe: Any, folder: Path | None) -> list[str]:
    """Load every SDXL textual inversion in ``folder``; returns the tokens that now work in prompts.

    The token is the file name without extension. SDXL embeddings hold one tensor per text
    encoder, ``clip_l`` (768-d, the first encoder) and ``clip_g`` (1280-d, the second); each half
    goes to its own tokenizer and encoder under the same token, so the prompt's token means the
    same thing to both. Files that are not SDXL embeddings are skipped with a warning rather than
    failing the whole worker.
    """
    if folder is None:
        return []
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        log.warning("embeddings folder %s does not exist; no textual inversions loaded", folder)
        return []
    tokens: list[str] = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in EMBEDDING_SUFFIXES):
        token = path.stem
        try:
            state = _read_tensors(path)
            if "clip_l" not in state or "clip_g" not in state:
                log.warning("skipping %s: not an SDXL embedding (needs clip_l and clip_g)", path.name)
                continue
            pipe.load_textual_inversion(
                state["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
            )
            pipe.load_textual_inversion(
                state["clip_g"], token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
            )
        except Exception as exc:  # one bad file must not take the worker down
            log.warning("skipping embedding %s: %s", path.name, _short(exc))
            continue
        tokens.append(token)
    if tokens:
        log.info("textual inversions loaded: %s", ", ".join(tokens))
    return tokens


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(loaded, dict):
        raise ValueError("not a dict of tensors")
    return {str(key): value for key, value in loaded.items() if isinstance(value, torch.Tensor)}


def adapter_name(name: str) -> str:
    """A PEFT-safe adapter name for a LoRA file stem (PEFT uses names as module attributes)."""
    return "lora_" + re.sub(r"\W", "_", name)


def load_loras(pipe: Any, folder: Path | None) -> tuple[dict[str, str], str | None]:
    """Load every ``*.safetensors`` LoRA in ``folder`` as a named, initially inactive adapter.

    Returns ``({prompt name: adapter name}, reason)`` where ``reason`` explains why LoRAs are
    unavailable (no PEFT installed, for example), or None.
    """
    if folder is None:
        return {}, None
    folder = Path(folder).expanduser()
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return {}, None
    loaded: dict[str, str] = {}
    for path in files:
        adapter = adapter_name(path.stem)
        try:
            pipe.load_lora_weights(str(folder), weight_name=path.name, adapter_name=adapter)
        except Exception as exc:  # one bad file must not take the worker down
            reason = _short(exc)
            if "peft" in reason.lower():
                log.warning("LoRAs disabled: %s (pip install peft)", reason)
                return loaded, "LoRAs need the peft package on the worker"
            log.warning("skipping LoRA %s: %s", path.name, reason)
            continue
        loaded[path.stem] = adapter
    if loaded:
        pipe.disable_lora()  # off until a prompt asks for one
        log.info("LoRAs loaded: %s", ", ".join(loaded))
    return loaded, None


def speed_up_for_gpu(pipe: Any, *, fuse_qkv: bool, channels_last: bool = False) -> None:
    """GPU-only levers: fused attention projections and, optionally, channels_last convolutions.

    channels_last is off by default: measured on an H200 in eager fp16, one SDXL UNet evaluation
    took 0.158 s with it against 0.146 s without (``bench/bench_unet_levers.py``).

    Fusing QKV lets each attention layer do one matmul instead of three. Diffusers keeps the
    unfused weights next to the fused copy; we point the old q/k/v weights at slices of the fused
    tensor instead, so the speed-up costs no extra GPU memory. It is skipped when LoRAs are
    loaded, because the fused projection would bypass their q/k/v adapters.
    """
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if not fuse_qkv:
        return
    pipe.fuse_qkv_projections(unet=True, vae=True)
    for model in (pipe.unet, pipe.vae):
        for module in model.modules():
            _share_fused_storage(module)


def _share_fused_storage(attention: Any) -> None:
    fused = getattr(attention, "to_qkv", None)
    parts = ("to_q", "to_k", "to_v")
    if fused is None:
        fused = getattr(attention, "to_kv", None)
        parts = ("to_k", "to_v")
    if fused is None:
        return
    with torch.no_grad():
        for attr in ("weight", "bias"):
            whole = getattr(fused, attr, None)
            if whole is None:
                continue
            offset = 0
            for part in parts:
                linear = getattr(attention, part)
                size = getattr(linear, attr).shape[0]
                setattr(linear, attr, torch.nn.Parameter(whole[offset : offset + size], requires_grad=False))
                offset += size


COMPILE_CACHE_LIMIT = 64  # graphs per compiled function: above the 41 aspect buckets


COMPILE_SCOPES: tuple[str, ...] = get_args(CompileScope)


def enable_compile(
    pipe: Any, cache_dir: Path | None, *, mode: str = "default", vae: bool = True, scope: str = "full"
) -> None:
    """``torch.compile`` the UNet (and the VAE decoder) in place, with Inductor's caches persisted.

    In-place (``Module.compile``) keeps the module objects, so the img2img and inpaint pipelines
    built from them share the compiled code. Shapes are static: each aspect bucket compiles its
    own, fastest kernels (the engine warms them up at start), and the recompile limit is raised
    above the number of buckets so no bucket ever falls back to eager. The persistent cache
    turns the minutes of the first compile into seconds on every later worker start.

    ``scope="blocks"`` compiles only the UNet's transformer blocks, whole-graph, through
    diffusers' ``compile_repeated_blocks``: the 70 identical blocks share one compiled graph, so
    a cold compile takes a fraction of the time (the convolutions between them stay eager).
    """
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"compile scope must be one of {', '.join(COMPILE_SCOPES)}, not {scope!r}")
    if cache_dir is not None:
        cache_dir = Path(cache_dir).expanduser()
        cache_dir.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    # SDXL's many 1x1 convolutions run faster as matmuls (PyTorch's own SDXL tuning advice).
    inductor_config.conv_1x1_as_mm = True
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), COMPILE_CACHE_LIMIT))
    if hasattr(dynamo_config, "accumulated_cache_size_limit"):
        dynamo_config.accumulated_cache_size_limit = max(dynamo_config.accumulated_cache_size_limit, 256)
    if hasattr(dynamo_config, "accumulated_recompile_limit"):
        dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 256)
    options = {"mode": mode} if mode and mode != "default" else {}
    if scope == "blocks":
        pipe.unet.compile_repeated_blocks(fullgraph=True, dynamic=False, **options)
    else:
        pipe.unet.compile(fullgraph=False, dynamic=False, **options)
    if vae:
        pipe.vae.decoder.compile(fullgraph=False, dynamic=False, **options)


ATTENTION_BACKENDS = ("auto", "measure", "flash", "efficient", "cudnn", "math")
# The kernels ``measure`` times, in the order used to break ties and to fall back.
MEASURED_BACKENDS = ("flash", "cudnn", "efficient")


def _sdpa_backends() -> dict[str, Any]:
    from torch.nn.attention import SDPBackend

    return {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }


def attention_backend(name: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """A context in which scaled-dot-product attention prefers the named kernel.

    ``auto`` and ``measure`` (once :func:`measure_attention` has replaced it) and any CPU leave
    PyTorch's own choice. A named kernel comes first and the others stay behind it in priority
    order: the VAE's attention (head dim 512) is a shape neither flash nor cuDNN can run, and
    with the named kernel alone every decode failed with "No available kernel".
    """
    name = name.strip().lower()
    if name not in ATTENTION_BACKENDS:
        raise WorkerError(
            ErrorCode.ENGINE_UNAVAILABLE,
            f"Unknown attention backend {name!r} ({', '.join(ATTENTION_BACKENDS)}).",
        )
    if name in ("auto", "measure") or device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    kernels = _sdpa_backends()
    order = [name, *(other for other in (*MEASURED_BACKENDS, "math") if other != name)]
    return sdpa_kernel([kernels[other] for other in order], set_priority=True)


def attention_shapes(unet: torch.nn.Module, latent_side: int, batch: int) -> list[tuple[int, ...]]:
    """(count, batch, heads, query length, key length, head dim) of the UNet's attention calls.

    Read from the UNet's configuration at a square ``latent_side``: every transformer layer of a
    cross-attention block runs one self-attention (keys: the pixels) and one cross-attention
    (keys: the 77 text tokens), down and up.
    """
    config = unet.config
    channels = list(config.block_out_channels)
    heads = config.attention_head_dim
    heads = list(heads) if isinstance(heads, list | tuple) else [heads] * len(channels)
    depth = config.transformer_layers_per_block
    depth = list(depth) if isinstance(depth, list | tuple) else [depth] * len(channels)
    shapes: list[tuple[int, ...]] = []
    for level, block in enumerate(config.down_block_types):
        if "CrossAttn" not in block:
            continue
        side = max(1, latent_side >> level)
        pixels = side * side
        head_dim = channels[level] // heads[level]
        # Down blocks run layers_per_block of them, up blocks one more; the mid block sits at
        # the deepest level.
        count = depth[level] * (2 * config.layers_per_block + 1)
        if level == len(channels) - 1 and "CrossAttn" in str(config.mid_block_type):
            count += depth[level]
        shapes.append((count, batch, heads[level], pixels, pixels, head_dim))
        shapes.append((count, batch, heads[level], pixels, 77, head_dim))
    return shapes


def measure_attention(
    unet: torch.nn.Module, device: torch.device, dtype: torch.dtype, latent_side: int, batch: int = 8
) -> tuple[str, dict[str, float]]:
    """Time each fast SDPA kernel on the UNet's own attention shapes: the fastest, and the times.

    Returns ``("auto", {})`` off CUDA. A kernel that cannot run a shape is left out; the times
    are milliseconds for one UNet evaluation's attention.
    """
    if device.type != "cuda":
        return "auto", {}
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    shapes = attention_shapes(unet, latent_side, batch)
    kernels = _sdpa_backends()
    times: dict[str, float] = {}
    for name in MEASURED_BACKENDS:
        total = 0.0
        try:
            with sdpa_kernel([kernels[name]]), torch.no_grad():
                for count, b, heads, q_len, k_len, head_dim in shapes:
                    q = torch.randn(b, heads, q_len, head_dim, device=device, dtype=dtype)
                    k = torch.randn(b, heads, k_len, head_dim, device=device, dtype=dtype)
                    v = torch.randn_like(k)
                    for _ in range(2):  # kernel selection and autotuning happen here
                        F.scaled_dot_product_attention(q, k, v)
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    for _ in range(5):
                        F.scaled_dot_product_attention(q, k, v)
                    end.record()
                    end.synchronize()
                    total += start.elapsed_time(end) / 5 * count
        except RuntimeError as exc:
            log.info("attention kernel %s cannot run SDXL's shapes here: %s", name, str(exc).splitlines()[0])
            continue
        times[name] = round(total, 3)
    if not times:
        return "auto", {}
    return min(times, key=lambda name: times[name]), times


def fp8_unavailable() -> str | None:
    """Why FP8 cannot run here (no torchao, no FP8-capable GPU), or None when it can."""
    try:
        import torchao.quantization  # noqa: F401
    except ImportError:
        return "FP8 skipped: torchao is not installed (pip install torchao)"
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        return "FP8 skipped: it needs an Ada, Hopper or newer GPU"
    return None


def quantize_fp8(unet: torch.nn.Module) -> str | None:
    """FP8 (e4m3, dynamic per-row activation scales) for the UNet's linear layers via torchao.

    Returns None when applied, else the reason it was skipped (:func:`fp8_unavailable`), which
    the caller logs: FP8 is an opt-in lever and its absence must not stop a worker.
    """
    reason = fp8_unavailable()
    if reason:
        return reason
    from torchao.quantization import quantize_

    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor

        # Per-row scales are torchao's bf16-only path; fp16 weights get one scale per tensor.
        granularity = PerRow() if unet.dtype == torch.bfloat16 else PerTensor()
        config: Any = Float8DynamicActivationFloat8WeightConfig(granularity=granularity)
    except ImportError:  # torchao before the config classes
        from torchao.quantization import float8_dynamic_activation_float8_weight

        config = float8_dynamic_activation_float8_weight()

    def eligible(module: torch.nn.Module, _fqn: str) -> bool:
        # FP8 matmuls need both sides a multiple of 16; the tiny embedding layers stay as they are.
        return (
            isinstance(module, torch.nn.Linear)
            and module.in_features % 16 == 0
            and module.out_features % 16 == 0
            and module.in_features >= 256
        )

    quantize_(unet, config, filter_fn=eligible)
    return None
