"""Benchmark: one SDXL UNet evaluation (batch 8 = a 2x2 grid with guidance) per GPU lever.

A short companion to ``bench_sdxl.py``: where that script times whole grids, this one isolates
the UNet, so a lever that slows the denoising loop shows up on its own. On the full-size
random-weight SDXL (built by ``bench_sdxl.build_full_size_sdxl``) it times, in one process and
against plain diffusers fp16 as the baseline: channels_last alone, diffusers' fused QKV alone,
Mirage's ``speed_up_for_gpu`` (both, with the fused weights shared), and the engine's own UNet
as ``SDXLEngine.load`` leaves it; then one whole grid from the engine with and without the
layout levers. Prints a table and writes JSON.

Usage::

    python bench/bench_unet_levers.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.bench_sdxl import _grid_request, _settings, build_full_size_sdxl


def _unet_inputs(unet: Any, batch: int, latent: int) -> dict[str, Any]:
    """Inputs shaped like one guided grid step at 1024² (latents 128², two text encoders)."""
    device, dtype = unet.device, unet.dtype
    return {
        "sample": torch.randn(batch, 4, latent, latent, device=device, dtype=dtype),
        "timestep": torch.tensor(500, device=device),
        "encoder_hidden_states": torch.randn(batch, 77, 2048, device=device, dtype=dtype),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, 1280, device=device, dtype=dtype),
            "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * batch, device=device, dtype=dtype),
        },
    }


def time_call(call: Callable[[], Any], *, warm: int = 2, runs: int = 6) -> float:
    """Median seconds of ``call`` after ``warm`` untimed calls, synchronising the GPU."""
    for _ in range(warm):
        call()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def describe(unet: Any) -> dict[str, Any]:
    """What the UNet runs as: weight dtypes, attention processors, conv layout."""
    conv = next(m for m in unet.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    return {
        "dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in unet.parameters()}),
        "processors": sorted({type(p).__name__ for p in unet.attn_processors.values()}),
        "channels_last": conv.weight.is_contiguous(memory_format=torch.channels_last),
    }


def main() -> int:
    """Run every measurement, each in its own try block, and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    from diffusers import StableDiffusionXLPipeline

    from workers.sdxl import loading
    from workers.sdxl.engine import SDXLEngine

    results: dict[str, Any] = {"device": torch.cuda.get_device_name()}

    def record(name: str, work: Callable[[], dict[str, Any]]) -> None:
        try:
            results[name] = work()
        except Exception as exc:  # a failed lever must not cost the others' numbers
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        torch.cuda.empty_cache()  # the variant's pipeline is gone; give its memory to the next
        print(name, results[name], flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_full_size_sdxl(Path(tmp) / "sdxl")

        def pipe_variant(apply: Callable[[Any], None]) -> Callable[[], dict[str, Any]]:
            def run() -> dict[str, Any]:
                pipe = StableDiffusionXLPipeline.from_pretrained(
                    str(model_dir), **{loading.dtype_kwarg(): torch.float16}
                ).to("cuda")
                apply(pipe)
                inputs = _unet_inputs(pipe.unet, 8, 128)
                with torch.no_grad():
                    seconds = time_call(lambda: pipe.unet(**inputs))
                return {"unet_s": round(seconds, 4), **describe(pipe.unet)}

            return run

        record("plain", pipe_variant(lambda pipe: None))
        record("channels_last", pipe_variant(lambda pipe: pipe.unet.to(memory_format=torch.channels_last)))
        record("fused_qkv", pipe_variant(lambda pipe: pipe.fuse_qkv_projections(unet=True, vae=False)))
        both = pipe_variant(lambda pipe: loading.speed_up_for_gpu(pipe, fuse_qkv=True, channels_last=True))
        record("speed_up_for_gpu", both)

        def engine_runs() -> dict[str, Any]:
            engine = SDXLEngine.load(_settings(model_dir))
            unet = engine.txt2img.unet
            inputs = _unet_inputs(unet, 8, 128)
            with torch.no_grad():
                unet_s = time_call(lambda: unet(**inputs))
            out: dict[str, Any] = {"unet_s": round(unet_s, 4), **describe(unet)}
            request = _grid_request(25)
            out["grid_s"] = round(time_call(lambda: engine.run(request), warm=1, runs=1), 3)
            out["phases"] = {k: round(v, 3) for k, v in engine.last_info.get("phases", {}).items()}
            # The same loaded engine with its layout levers taken back one at a time.
            unet.to(memory_format=torch.contiguous_format)
            with torch.no_grad():
                out["contiguous_unet_s"] = round(time_call(lambda: unet(**inputs)), 4)
            out["contiguous_grid_s"] = round(time_call(lambda: engine.run(request), warm=1, runs=1), 3)
            engine.txt2img.unfuse_qkv_projections(unet=True, vae=False)
            with torch.no_grad():
                out["unfused_unet_s"] = round(time_call(lambda: unet(**inputs)), 4)
            out["unfused"] = describe(unet)
            out["unfused_grid_s"] = round(time_call(lambda: engine.run(request), warm=1, runs=1), 3)
            return out

        record("engine", engine_runs)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
