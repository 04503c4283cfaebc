"""Benchmark: a 2x2 SDXL grid, plain diffusers against Mirage's SDXLEngine, on the same weights.

Speed does not depend on the weights' values, so no download is needed: the script builds the
full-size SDXL architecture from its published configuration with random weights, saves it with
``save_pretrained`` (fp16 safetensors) and then times, in one process:

1. plain diffusers: ``StableDiffusionXLPipeline.from_pretrained(dir, fp16).to("cuda")`` with
   its defaults (scheduler from the config), one batch of 4 at 1024², 25 steps;
2. Mirage: ``SDXLEngine.load(settings)`` on the same folder and ``engine.run`` of an IMAGINE job
   (4 images, 1024², 25 steps, DPM++ 2M Karras), with whatever levers the engine applies.

Each side gets an untimed warm-up call, then ``--runs`` timed calls (median reported), and its
peak GPU memory (``torch.cuda.max_memory_allocated``) over the timed calls.

Usage::

    python bench/bench_sdxl.py                 # GPU, full size (needs ~16 GB of disk for the weights)
    python bench/bench_sdxl.py --compile       # also torch.compile the engine's UNet
    python bench/bench_sdxl.py --tiny          # CPU smoke test: tiny model, 64 px, 2 steps

Quality is not measured here: random weights draw noise. Only speed and memory mean anything.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from workers.schema import GenerationParams, JobKind, JobRequest
from workers.settings import WorkerSettings

PROMPT = "a lighthouse on a cliff at dusk, dramatic clouds, photograph"


def build_full_size_sdxl(path: Path) -> Path:
    """Save the full-size SDXL base architecture with random weights (fp16) to ``path``.

    Published SDXL base configuration: UNet 320/640/1280 channels, transformer depth 1/2/10,
    head dims 5/10/20, cross-attention 2048, text-time embedding 256 x 6 + 1280 = 2816; CLIP
    ViT-L/14 text encoder (768 wide, 12 layers) and OpenCLIP bigG with projection (1280 wide,
    32 layers, 20 heads, projection 1280); the SDXL VAE (128/256/512/512, scaling 0.13025).
    The tokenizer is the tiny local one: token ids only need to be valid, not meaningful.
    """
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from workers.sdxl.tiny import write_tiny_tokenizer

    if (path / "model_index.json").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    build_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(str(write_tiny_tokenizer(Path(tmp))))
    torch.manual_seed(0)
    # Random init straight on the GPU: initialising 3.5 B parameters on a CPU takes minutes.
    with build_device:
        unet = UNet2DConditionModel(
            sample_size=128,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            attention_head_dim=(5, 10, 20),
            transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            norm_num_groups=32,
        ).half()
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            sample_size=1024,
            scaling_factor=0.13025,
            force_upcast=True,
        ).half()
        common = {
            "vocab_size": 49408,
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                hidden_act="quick_gelu",
                projection_dim=768,
                **common,
            )
        ).half()
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig(
                hidden_size=1280,
                intermediate_size=5120,
                num_hidden_layers=32,
                num_attention_heads=20,
                hidden_act="gelu",
                projection_dim=1280,
                **common,
            )
        ).half()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
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
    del pipe, unet, vae, text_encoder, text_encoder_2
    _free()
    return path


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _measure(call: Callable[[], Any], runs: int) -> dict[str, Any]:
    """Warm-up once, then time ``runs`` calls; peak GPU memory over the timed calls."""
    call()
    _sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        _sync()
        times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"median_s": statistics.median(times), "times_s": times, "peak_gib": peak}


def _bench_plain(model_dir: Path, *, dtype: torch.dtype, size: int, steps: int, runs: int) -> dict[str, Any]:
    """Plain diffusers as the docs show it: from_pretrained, .to(device), defaults."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import deprecation_utils

    dtype_key = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
    started = time.perf_counter()
    pipe = StableDiffusionXLPipeline.from_pretrained(str(model_dir), **{dtype_key: dtype})
    pipe.to("cuda" if torch.cuda.is_available() else "cpu")
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - started

    def grid() -> None:
        pipe(
            prompt=PROMPT,
            height=size,
            width=size,
            num_inference_steps=steps,
            num_images_per_prompt=4,
            generator=torch.Generator("cpu").manual_seed(1),
        )

    return {"load_s": load_s, **_measure(grid, runs)}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def bench(model_dir: Path, *, size: int, steps: int, runs: int, compile_unet: bool) -> dict[str, Any]:
    """Time plain diffusers and the engine on ``model_dir``; returns both results and the ratio."""
    from workers.sdxl.engine import SDXLEngine

    gpu = torch.cuda.is_available()
    dtype = torch.float16 if gpu else torch.float32
    results: dict[str, Any] = {}

    results["plain"] = _bench_plain(model_dir, dtype=dtype, size=size, steps=steps, runs=runs)
    _free()

    settings = WorkerSettings(
        _env_file=None,  # type: ignore[call-arg]
        sdxl_model=str(model_dir),
        warmup=True,
        torch_compile=compile_unet,
        compile_cache_dir=model_dir.parent / "inductor-cache" if compile_unet else None,
    )
    started = time.perf_counter()
    engine = SDXLEngine.load(settings)
    load_s = time.perf_counter() - started
    assert engine.base_resolution == size, (engine.base_resolution, size)
    request = JobRequest(
        job_id="bench",
        kind=JobKind.IMAGINE,
        params=GenerationParams(prompt=PROMPT, steps=steps),
        seed=1,
    )
    results["mirage"] = {"load_s": load_s, **_measure(lambda: engine.run(request), runs)}
    results["speedup"] = results["plain"]["median_s"] / results["mirage"]["median_s"]
    if gpu:
        results["memory_ratio"] = results["mirage"]["peak_gib"] / results["plain"]["peak_gib"]
    return results


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tiny", action="store_true", help="CPU smoke test with the tiny model (64 px, 2 steps)"
    )
    parser.add_argument("--model-dir", type=Path, help="where to save (or reuse) the random-weight model")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per side (median reported)")
    parser.add_argument("--steps", type=int, help="override the step count (25 full size, 2 tiny)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the engine's UNet")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is steadier on a shared CPU)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)

    if not args.tiny and not torch.cuda.is_available():
        parser.error("the full-size benchmark needs a CUDA GPU; use --tiny for the CPU smoke test")
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="mirage-bench-"))
    try:
        if args.tiny:
            from workers.sdxl.tiny import make_tiny_model

            model_dir = args.model_dir or workdir / "tiny-sdxl"
            if not (model_dir / "model_index.json").exists():
                make_tiny_model(model_dir)
            size, steps = 64, args.steps or 2
        else:
            model_dir = args.model_dir or workdir / "sdxl-random"
            started = time.perf_counter()
            build_full_size_sdxl(model_dir)
            print(f"random-weight SDXL ready in {model_dir} ({time.perf_counter() - started:.0f}s)")
            size, steps = 1024, args.steps or 25

        results = bench(model_dir, size=size, steps=steps, runs=args.runs, compile_unet=args.compile)
    finally:
        # A random 7 GB model is not worth keeping unless asked for with --model-dir.
        if args.model_dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"{_cpu_name()}, {os.cpu_count()} cores, no GPU"
    )
    print(f"\nSDXL 2x2 grid, {size}x{size}, {steps} steps, {args.runs} timed runs, device: {device}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'':8} {'load s':>8} {'median s':>9} {'peak GiB':>9}")
    for name in ("plain", "mirage"):
        row = results[name]
        peak = f"{row['peak_gib']:.2f}" if row["peak_gib"] is not None else "n/a"
        print(f"{name:8} {row['load_s']:8.2f} {row['median_s']:9.3f} {peak:>9}")
    print(f"speed-up (plain / mirage): {results['speedup']:.2f}x")
    if "memory_ratio" in results:
        print(f"peak memory (mirage / plain): {results['memory_ratio']:.2f}x")
    print(f"max RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    if args.json:
        args.json.write_text(
            json.dumps({"device": device, "size": size, "steps": steps, **results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
