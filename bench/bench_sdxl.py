"""Benchmark: what a member waits for on a 2x2 SDXL grid, lever by lever, against plain diffusers.

Speed does not depend on the weights' values, so no download is needed: the script builds the
full-size SDXL architecture from its published configuration with random weights (directly on the
GPU, in fp16), saves it with ``save_pretrained`` and loads it back through the engine's own
``from_pretrained`` code. In one run it measures:

- ``plain``: ``StableDiffusionXLPipeline.from_pretrained(dir, fp16).to("cuda")`` with diffusers'
  defaults, one batch of 4 at 1024², 25 steps: the baseline every ratio is taken against;
- ``fast``: Mirage's ``SDXLEngine`` with every run-time lever on (eager), per phase: text
  encoders, UNet loop, VAE decode, postprocess;
- one configuration per lever switched off or changed (VAE precision, CPU postprocessing,
  previews on the host, each SDPA kernel), draft mode, and the upscale with 4 vs 9 tiles;
- ``compile_cold``: a fresh process with ``TORCH_COMPILE`` and an empty compile cache (UNet and
  VAE decoder): load, compile and first grid, then timed grids; ``compile_warm_cache``: a second
  process on the same cache, i.e. a worker restart; ``compile_blocks``: the same with
  ``COMPILE_SCOPE=blocks`` (only the UNet's transformer blocks, a much shorter compile);
  optionally FP8 (torchao, compiled with ``--fp8-compile-scope``) and another compile mode, each
  in its own process.

Every section records its error and the run goes on; the JSON file is rewritten after each
section, so a run cut short still leaves its numbers. ``--budget-s`` skips what no longer fits.

Usage::

    python bench/bench_sdxl.py --json out.json          # GPU, full size (~7 GB of disk for weights)
    python bench/bench_sdxl.py --tiny                   # CPU smoke test: tiny model, 64 px
    python bench/bench_sdxl.py --table out.json         # print the table of a (partial) run

Quality is not measured here: random weights draw noise. Only speed and memory mean anything.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from workers.schema import GenerationParams, JobKind, JobRequest, b64encode_bytes  # noqa: E402
from workers.settings import CompileScope, WorkerSettings  # noqa: E402

PROMPT = "a lighthouse on a cliff at dusk, dramatic clouds, photograph"
CHILD_MARK = "BENCH_CHILD_RESULT "
PHASES = ("text_encode", "denoise", "vae_decode", "postprocess")


# --------------------------------------------------------------------------- the model


def build_full_size_sdxl(path: Path) -> Path:
    """Save the full-size SDXL base architecture with random weights (fp16) to ``path``.

    Published SDXL base configuration: UNet 320/640/1280 channels, transformer depth 1/2/10,
    head dims 5/10/20, cross-attention 2048, text-time embedding 256 x 6 + 1280 = 2816; CLIP
    ViT-L/14 text encoder (768 wide, 12 layers) and OpenCLIP bigG with projection (1280 wide,
    32 layers, 20 heads, projection 1280); the SDXL VAE (128/256/512/512, scaling 0.13025,
    ``force_upcast`` as the original). The tokenizer is the tiny local one: token ids only need
    to be valid, not meaningful.
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
    # Random init straight on the GPU (initialising 3.5 B parameters on a CPU takes minutes), each
    # module cast to fp16 as soon as it exists, so the fp32 copies never pile up.
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


# ------------------------------------------------------------------------------- helpers


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def _timed_runs(call: Callable[[], Any], runs: int, warm: int = 1) -> dict[str, Any]:
    """``warm`` untimed calls, then ``runs`` timed ones: median, all times, per-phase medians, peak."""
    first_call_s = None
    for _ in range(warm):
        started = time.perf_counter()
        call()
        _sync()
        first_call_s = first_call_s or round(time.perf_counter() - started, 3)
    _reset_peak()
    times: list[float] = []
    phases: list[dict[str, float]] = []
    extra: dict[str, Any] = {}
    for _ in range(runs):
        started = time.perf_counter()
        out = call()
        _sync()
        times.append(time.perf_counter() - started)
        if out is not None and hasattr(out, "phases"):
            phases.append(out.phases)
            extra["notes"] = out.notes
    result: dict[str, Any] = {
        "median_s": round(statistics.median(times), 4),
        "times_s": [round(t, 4) for t in times],
        "peak_gib": _peak_gib(),
    }
    if first_call_s is not None:
        result["first_call_s"] = first_call_s  # the untimed warm-up call: kernel choices, allocator
    if phases:
        result["phases_s"] = {
            name: round(statistics.median(p.get(name, 0.0) for p in phases), 4) for name in PHASES
        }
    result.update(extra)
    return result


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{_cpu_name()}, {os.cpu_count()} cores, no GPU"


def _grid_request(steps: int, *, draft: bool = False, job_id: str = "bench") -> JobRequest:
    return JobRequest(
        job_id=job_id,
        kind=JobKind.IMAGINE,
        params=GenerationParams(prompt=PROMPT, steps=steps, draft=draft),
        seed=1,
    )


def save_reference(images: list[Any], path: Path) -> None:
    """The eager engine's grid images (uint8), for the fresh processes to compare against."""
    import numpy as np

    np.savez(path, *[np.asarray(image.convert("RGB")) for image in images])


def compare_to_reference(images: list[Any], path: Path) -> dict[str, Any]:
    """PSNR (dB) and largest pixel difference of ``images`` against the saved eager grid.

    The quality check for levers that may change pixels (compile within tolerance, FP8's
    rounding): same seed, same prompt, same steps. Identical images report ``psnr_db`` None.
    """
    import numpy as np

    with np.load(path) as saved:
        reference = [saved[key] for key in sorted(saved.files, key=lambda k: int(k.split("_")[1]))]
    if len(reference) != len(images):
        return {"error": f"{len(images)} images against {len(reference)} in the reference"}
    ours = np.stack([np.asarray(image.convert("RGB")) for image in images]).astype(np.float64)
    theirs = np.stack(reference).astype(np.float64)
    mse = float(np.mean((ours - theirs) ** 2))
    return {
        "psnr_db": round(10 * np.log10(255.0**2 / mse), 2) if mse > 0 else None,
        "max_abs_diff": int(np.max(np.abs(ours - theirs))),
    }


def _settings(model_dir: Path, **values: Any) -> WorkerSettings:
    return WorkerSettings(_env_file=None, sdxl_model=str(model_dir), warmup=False, **values)  # type: ignore[call-arg]


class Recorder:
    """Runs sections, keeps going past failures and rewrites the JSON file after each one."""

    def __init__(
        self, path: Path | None, meta: dict[str, Any], budget_s: float, skip: frozenset[str] = frozenset()
    ) -> None:
        """Record into ``path`` (if any); skip sections past ``budget_s`` seconds or named in ``skip``."""
        self.path = path
        self.skip = skip
        self.started = time.monotonic()
        self.budget_s = budget_s
        self.data: dict[str, Any] = {"meta": meta, "sections": {}}
        self.save()

    def remaining(self) -> float:
        """Seconds left of the budget."""
        return self.budget_s - (time.monotonic() - self.started)

    def save(self) -> None:
        """Write the JSON now (atomically: a reader never sees half a file)."""
        self.data["meta"]["elapsed_s"] = round(time.monotonic() - self.started, 1)
        if self.path is not None:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=2, default=str))
            tmp.replace(self.path)

    def section(
        self, name: str, call: Callable[[], dict[str, Any]], *, needs_s: float = 0.0
    ) -> dict[str, Any]:
        """Run one measurement; its result, or its error, or why it was skipped, goes in the JSON."""
        if name in self.skip:
            result: dict[str, Any] = {"skipped": "--skip"}
        elif self.remaining() < needs_s:
            result = {"skipped": f"budget: {self.remaining():.0f}s left, needs ~{needs_s:.0f}s"}
        else:
            print(f"--- {name} ({self.remaining():.0f}s of budget left)", flush=True)
            started = time.monotonic()
            try:
                result = call()
            except Exception as exc:  # every section is independent: record and go on
                result = {
                    "error": f"{type(exc).__name__}: {exc}"[:1000],
                    "traceback": traceback.format_exc()[-3000:],
                }
                print(f"    error: {result['error']}", flush=True)
            result["section_s"] = round(time.monotonic() - started, 1)
            _free()
        self.data["sections"][name] = result
        self.save()
        summary = {k: result[k] for k in ("median_s", "first_grid_s", "load_s", "skipped") if k in result}
        print(f"    {name}: {summary}", flush=True)
        return result


# ------------------------------------------------------------------------------ sections


def bench_plain(model_dir: Path, *, size: int, steps: int, runs: int) -> dict[str, Any]:
    """Plain diffusers as its docs show it: from_pretrained in fp16, .to(device), defaults."""
    from diffusers import StableDiffusionXLPipeline

    from workers.sdxl.loading import dtype_kwarg

    gpu = torch.cuda.is_available()
    started = time.perf_counter()
    pipe = StableDiffusionXLPipeline.from_pretrained(
        str(model_dir), **{dtype_kwarg(): torch.float16 if gpu else torch.float32}
    )
    pipe.to("cuda" if gpu else "cpu")
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

    return {"load_s": round(load_s, 2), **_timed_runs(grid, runs)}


def bench_levers(engine: Any, rec: Recorder, *, steps: int, runs: int, size: int) -> None:
    """Each lever switched off (or changed) in turn on the loaded engine, with everything else on."""
    from workers.sdxl.engine import Levers

    request = _grid_request(steps)
    fast = Levers(**engine.levers.__dict__)  # as loaded: the measured attention kernel included
    fast_vae = engine.vae.dtype

    def config(**changes: Any) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            vae_mode = changes.pop("vae_dtype", None)
            progress = changes.pop("progress", False)
            engine.levers = Levers(**{**fast.__dict__, **changes})
            engine.vae.retries = 0
            if vae_mode:
                engine.set_vae_dtype(vae_mode)
            reports: list[Any] = []
            saved_interval = engine.progress_interval_s
            if progress:
                engine.progress_interval_s = 1e-9  # a report every step: the previews' worst case
            try:
                result = _timed_runs(lambda: engine.run(request, reports.append if progress else None), runs)
            finally:
                engine.progress_interval_s = saved_interval
                engine.levers = Levers(**fast.__dict__)
                if vae_mode:
                    engine.set_vae_dtype(_dtype_name(fast_vae))
            result["vae_dtype"] = vae_mode or _dtype_name(fast_vae)
            # fp16 decodes that overflowed and were redone in fp32 (random weights may overflow).
            result["vae_fp32_retries"] = engine.vae.retries
            if progress:
                result["reports"] = len(reports)
                result["previews"] = sum(1 for report in reports if report.preview)
            return result

        return run

    per = 4.0  # rough seconds per measured grid on an H100, for the budget check
    need = per * (runs + 1)
    # Most telling first: kernels, draft and upscale, then the run-time levers around the UNet.
    for backend in ("flash", "efficient", "cudnn"):
        rec.section(f"attention_{backend}", config(attention_backend=backend), needs_s=need)

    def draft() -> dict[str, Any]:
        result = _timed_runs(lambda: engine.run(_grid_request(steps, draft=True)), runs)
        result["unet_full"] = engine.last_info.get("unet_full")
        result["unet_shallow"] = engine.last_info.get("unet_shallow")
        result["steps"] = engine.last_info.get("steps")
        return result

    rec.section("draft", draft, needs_s=need)

    grid = engine.run(_grid_request(steps)).images[0]
    from workers.imaging import encode_png

    source = b64encode_bytes(encode_png(grid))
    upscale = JobRequest(
        job_id="bench-upscale",
        kind=JobKind.UPSCALE,
        params=GenerationParams(prompt=PROMPT, steps=steps),
        seed=1,
        count=1,
        input_image=source,
        scale=2.0,
    )

    def upscale_with(fewest: bool) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            engine.levers = Levers(**{**fast.__dict__, "upscale_fewest_tiles": fewest})
            try:
                result = _timed_runs(lambda: engine.run(upscale), max(1, runs - 1))
            finally:
                engine.levers = Levers(**fast.__dict__)
            result["tiles"] = engine.last_info.get("tiles")
            result["size"] = engine.last_info.get("size")
            return result

        return run

    rec.section("upscale_fewest_tiles", upscale_with(True), needs_s=2 * per * runs)
    rec.section("upscale_base_tiles", upscale_with(False), needs_s=3 * per * runs)
    rec.section("vae_float32", config(vae_dtype="float32"), needs_s=need)
    rec.section("vae_float16", config(vae_dtype="float16"), needs_s=need)
    rec.section("vae_bfloat16", config(vae_dtype="bfloat16"), needs_s=need)
    rec.section("cpu_postprocess", config(gpu_postprocess=False), needs_s=need)
    rec.section("previews_gpu", config(progress=True), needs_s=need)
    rec.section("previews_cpu", config(progress=True, gpu_previews=False), needs_s=need)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def run_child(args: list[str], timeout_s: float, extra_path: str | None = None) -> dict[str, Any]:
    """Run this script in a fresh process (``--child``) and return the result it prints."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if extra_path:
        env["PYTHONPATH"] = extra_path + os.pathsep + env.get("PYTHONPATH", "")
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--child", *args],
            capture_output=True,
            text=True,
            timeout=max(5.0, timeout_s),
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or b"")[-2000:] if isinstance(exc.stdout, bytes) else (exc.stdout or "")[-2000:]
        return {"error": f"timed out after {timeout_s:.0f}s", "output_tail": str(tail)}
    wall = round(time.monotonic() - started, 1)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(CHILD_MARK):
            return {**json.loads(line[len(CHILD_MARK) :]), "process_wall_s": wall}
    return {
        "error": f"child exited {proc.returncode} without a result",
        "output_tail": (proc.stdout + proc.stderr)[-3000:],
    }


def child_main(args: argparse.Namespace) -> int:
    """One fresh process: load the engine as configured, time the first grid and a few more."""
    result: dict[str, Any] = {}
    try:
        from workers.sdxl.engine import SDXLEngine

        process_start = time.perf_counter()
        settings = _settings(
            args.model_dir,
            torch_compile=bool(args.compile_mode),
            compile_mode=args.compile_mode or "default",
            compile_scope=args.compile_scope,
            compile_cache_dir=args.cache_dir,
            fp8=args.fp8,
            compile_warmup_aspects="1:1",
        )
        engine = SDXLEngine.load(settings)
        _sync()
        result["load_s"] = round(time.perf_counter() - process_start, 2)
        request = _grid_request(args.steps)
        started = time.perf_counter()
        first = engine.run(request)
        _sync()
        result["first_grid_s"] = round(time.perf_counter() - started, 2)
        result["first_grid_phases_s"] = {k: round(v, 3) for k, v in first.phases.items()}
        if args.reference and Path(args.reference).exists():
            result["vs_eager"] = compare_to_reference(first.images, Path(args.reference))
        result["load_plus_first_grid_s"] = round(result["load_s"] + result["first_grid_s"], 2)
        result["notes"] = first.notes
        if args.runs > 0:
            result.update(_timed_runs(lambda: engine.run(request), args.runs, warm=0))
        result["fp8"] = engine.fp8_status
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"[:1000]
        result["traceback"] = traceback.format_exc()[-3000:]
    print(CHILD_MARK + json.dumps(result, default=str), flush=True)
    return 0


def bench(args: argparse.Namespace, model_dir: Path, rec: Recorder, *, size: int, steps: int) -> None:
    """Every section, most important first, so a short budget keeps what matters."""
    from workers.sdxl.engine import SDXLEngine

    gpu = torch.cuda.is_available()
    per = 6.0 if gpu else 1.0
    if not args.no_plain:
        rec.section(
            "plain", lambda: bench_plain(model_dir, size=size, steps=steps, runs=args.runs), needs_s=per * 6
        )

    engine_box: dict[str, Any] = {}
    reference = Path(args.workdir) / "eager-grid.npz"  # what compiled and FP8 grids are checked against

    def load_fast() -> dict[str, Any]:
        started = time.perf_counter()
        engine = SDXLEngine.load(_settings(model_dir, attention_backend=args.attention))
        _sync()
        engine_box["engine"] = engine
        load_s = time.perf_counter() - started
        result = _timed_runs(lambda: engine.run(_grid_request(steps)), args.runs)
        save_reference(engine.run(_grid_request(steps)).images, reference)
        return {
            "load_s": round(load_s, 2),
            "vae_dtype": _dtype_name(engine.vae.dtype),
            "attention": engine.levers.attention_backend,
            "attention_ms": engine.attention_times_ms,
            **result,
        }

    rec.section("fast", load_fast, needs_s=per * 5)

    cache_dir = Path(args.workdir) / "inductor-cache"
    child_common = ["--model-dir", str(model_dir), "--steps", str(steps), "--reference", str(reference)]
    modes = [mode.strip() for mode in args.compile_modes.split(",") if mode.strip()]

    def compiled(mode: str, cache: Path, runs: int, scope: str = "full") -> Callable[[], dict[str, Any]]:
        """A section: a fresh process that compiles (``mode``, ``scope``) on the Inductor cache ``cache``."""

        def run() -> dict[str, Any]:
            child = [*child_common, "--compile-mode", mode, "--compile-scope", scope]
            child += ["--cache-dir", str(cache), "--runs", str(runs)]
            limit = min(args.child_timeout_s, rec.remaining() - 5)
            return {"mode": mode, "compile_scope": scope, **run_child(child, limit)}

        return run

    if modes:
        first_mode = modes[0]
        cold, warm = compiled(first_mode, cache_dir, args.runs), compiled(first_mode, cache_dir, 1)
        rec.section("compile_cold", cold, needs_s=150.0 if gpu else 120.0)
        # A second process on the cache the first one left: a worker restart.
        rec.section("compile_warm_cache", warm, needs_s=60.0 if gpu else 40.0)
        blocks = compiled(first_mode, Path(args.workdir) / "inductor-cache-blocks", args.runs, "blocks")
        rec.section("compile_blocks", blocks, needs_s=90.0 if gpu else 40.0)

    if args.fp8:
        ao_path = args.torchao_path

        def fp8() -> dict[str, Any]:
            if importlib.util.find_spec("torchao") is None and not (ao_path and Path(ao_path).is_dir()):
                return {"skipped": "torchao is not installed; FP8 not measured"}
            # Compiled when a compile still fits, else eager (FP8's quantize step costs extra there).
            mode = modes[0] if modes and rec.remaining() > (200 if gpu else 120) else ""
            child_args = [*child_common, "--fp8", "--runs", str(args.lever_runs)]
            if mode:
                child_args += [
                    "--compile-mode",
                    mode,
                    "--compile-scope",
                    args.fp8_compile_scope,
                    "--cache-dir",
                    str(Path(args.workdir) / "inductor-cache-fp8"),
                ]
            return {
                "compile_mode": mode or None,
                "compile_scope": args.fp8_compile_scope if mode else None,
                **run_child(child_args, min(args.child_timeout_s, rec.remaining() - 5), ao_path),
            }

        rec.section("fp8", fp8, needs_s=60.0 if gpu else 20.0)

    engine = engine_box.get("engine")
    if engine is not None:
        bench_levers(engine, rec, steps=steps, runs=args.lever_runs, size=size)
        del engine
        engine_box.clear()
        _free()

    for mode in modes[1:]:
        cache = Path(args.workdir) / f"cache-{mode}"
        rec.section(f"compile_{mode}", compiled(mode, cache, args.lever_runs), needs_s=200.0 if gpu else 60.0)


# -------------------------------------------------------------------------------- report


def print_table(data: dict[str, Any]) -> None:
    """The table of a (possibly partial) run: seconds per grid, phases, ratios against plain."""
    meta = data.get("meta", {})
    sections: dict[str, Any] = data.get("sections", {})
    print(
        f"\nSDXL 2x2 grid {meta.get('size')}x{meta.get('size')}, {meta.get('steps')} steps, "
        f"device: {meta.get('device')}"
    )
    print(
        f"torch {meta.get('torch')}, diffusers {meta.get('diffusers')}, "
        f"transformers {meta.get('transformers')}"
    )
    plain = sections.get("plain", {}).get("median_s")
    header = (
        f"{'configuration':24} {'s/grid':>8} {'x plain':>8} {'text':>7} {'unet':>7} {'vae':>7} "
        f"{'post':>7} {'GiB':>6}"
    )
    print(header)
    print("-" * len(header))
    for name, row in sections.items():
        if "skipped" in row or "error" in row:
            reason = row.get("skipped") or row.get("error")
            print(f"{name:24} {'skipped' if 'skipped' in row else 'ERROR'}: {str(reason)[:90]}")
            continue
        median = row.get("median_s")
        phases = row.get("phases_s") or row.get("first_grid_phases_s") or {}
        # Upscales are not grids: their ratio is against the base-size tiling, not plain diffusers.
        base = sections.get("upscale_base_tiles", {}).get("median_s") if name.startswith("upscale") else plain
        ratio = f"{base / median:8.2f}" if base and median else f"{'':>8}"
        cells = " ".join(f"{phases[p]:7.3f}" if p in phases else f"{'':>7}" for p in PHASES)
        peak = row.get("peak_gib")
        median_text = f"{median:8.3f}" if median is not None else f"{'':>8}"
        print(f"{name:24} {median_text} {ratio} {cells} {peak if peak is not None else '':>6}")
        extras = {
            key: row[key]
            for key in (
                "load_s", "first_call_s", "first_grid_s", "load_plus_first_grid_s", "vae_dtype",
                "vae_fp32_retries", "tiles", "unet_full", "unet_shallow", "steps", "previews", "reports",
                "mode", "notes", "fp8", "attention", "attention_ms", "compile_mode", "compile_scope",
                "vs_eager",
            )
            if key in row and row[key] not in (None, [], "")
        }  # fmt: skip
        if extras:
            print(f"{'':24}   {extras}")
    print("x plain: plain diffusers' seconds per grid / this row's (upscale rows: / the 9-tile upscale's)")
    print(f"(elapsed {meta.get('elapsed_s')} s)")


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test with the tiny model (64 px)")
    parser.add_argument("--model-dir", type=Path, help="where to save (or reuse) the random-weight model")
    parser.add_argument("--runs", type=int, default=3, help="timed grids for plain, fast and compiled")
    parser.add_argument("--lever-runs", type=int, default=2, help="timed grids per lever configuration")
    parser.add_argument("--steps", type=int, help="override the step count (25 full size, 4 tiny)")
    parser.add_argument(
        "--compile-modes",
        default=None,
        help="comma-separated torch.compile modes to measure, first one also from a warm cache "
        "(default: 'default' on a GPU, none with --tiny; '' for none)",
    )
    parser.add_argument("--attention", default="measure", help="SDPA kernel for the 'fast' configuration")
    parser.add_argument("--fp8", action="store_true", help="also measure FP8 (torchao) in its own process")
    parser.add_argument(
        "--fp8-compile-scope",
        default="blocks",
        choices=get_args(CompileScope),
        help="what the FP8 process compiles (a full cold compile of the FP8 UNet took over 4 minutes)",
    )
    parser.add_argument("--torchao-path", help="a folder holding torchao, added to the FP8 process's path")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain diffusers baseline")
    parser.add_argument("--skip", default="", help="comma-separated sections not to run (e.g. vae_float32)")
    parser.add_argument("--budget-s", type=float, default=1e9, help="skip sections that no longer fit")
    parser.add_argument("--child-timeout-s", type=float, default=300.0, help="limit for each child process")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is steadier on a shared CPU)")
    parser.add_argument("--json", type=Path, help="write the results here (rewritten after each section)")
    parser.add_argument("--table", type=Path, help="only print the table of an earlier run's JSON")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compile-mode", default="", help=argparse.SUPPRESS)
    parser.add_argument("--compile-scope", default="full", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--reference", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.table:
        print_table(json.loads(args.table.read_text()))
        return 0
    if args.child:
        return child_main(args)
    if not args.tiny and not torch.cuda.is_available():
        parser.error("the full-size benchmark needs a CUDA GPU; use --tiny for the CPU smoke test")
    if args.compile_modes is None:
        # The second mode runs last and only if the budget still allows a compile from scratch.
        args.compile_modes = "" if args.tiny else "default,max-autotune-no-cudagraphs"

    import diffusers
    import transformers

    workdir = Path(tempfile.mkdtemp(prefix="mirage-bench-"))
    args.workdir = str(workdir)
    try:
        if args.tiny:
            from workers.sdxl.tiny import make_tiny_model

            model_dir = args.model_dir or workdir / "tiny-sdxl"
            if not (model_dir / "model_index.json").exists():
                make_tiny_model(model_dir)
            size, steps = 64, args.steps or 4
        else:
            model_dir = args.model_dir or workdir / "sdxl-random"
            size, steps = 1024, args.steps or 25
        meta = {
            "device": _device_name(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "size": size,
            "steps": steps,
            "runs": args.runs,
            "lever_runs": args.lever_runs,
            "compile_modes": args.compile_modes,
            "threads": torch.get_num_threads(),
        }
        skip = frozenset(name.strip() for name in args.skip.split(",") if name.strip())
        rec = Recorder(args.json, meta, args.budget_s, skip)
        if not args.tiny:

            def build() -> dict[str, Any]:
                started = time.perf_counter()
                build_full_size_sdxl(model_dir)
                return {"build_s": round(time.perf_counter() - started, 1)}

            built = rec.section("build", build)
            if "error" in built:
                print_table(rec.data)
                return 1
        bench(args, model_dir, rec, size=size, steps=steps)
        rec.save()
        print_table(rec.data)
    finally:
        # A random 7 GB model is not worth keeping unless asked for with --model-dir.
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
