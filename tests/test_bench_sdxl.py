"""bench/bench_sdxl.py runs end to end on the tiny model (functional only: no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "bench_sdxl.py"


@pytest.mark.slow
def test_tiny_bench_measures_every_section(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), SDXL_HEALTH_FILE=str(tmp_path / "health.json"))
    result = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--tiny",
            "--model-dir",
            str(tiny_model_dir),
            "--runs",
            "1",
            "--lever-runs",
            "1",
            "--steps",
            "2",
            "--threads",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    sections = data["sections"]
    expected = {
        "plain", "fast", "vae_float32", "vae_float16", "vae_bfloat16", "cpu_postprocess", "previews_gpu",
        "previews_cpu", "attention_flash", "attention_efficient", "attention_cudnn", "draft",
        "upscale_fewest_tiles", "upscale_base_tiles",
    }  # fmt: skip
    assert expected <= set(sections)
    errors = {name: row["error"] for name, row in sections.items() if "error" in row}
    assert not errors
    for name in expected:
        assert sections[name]["median_s"] > 0, name
    for name in expected - {"plain", "upscale_fewest_tiles", "upscale_base_tiles"}:
        assert set(sections[name]["phases_s"]) == {"text_encode", "denoise", "vae_decode", "postprocess"}
    assert sections["vae_bfloat16"]["vae_dtype"] == "bfloat16"
    assert sections["draft"]["unet_full"] < sections["draft"]["steps"]
    assert (sections["upscale_fewest_tiles"]["tiles"], sections["upscale_base_tiles"]["tiles"]) == (4, 9)
    assert sections["previews_gpu"]["previews"] < sections["previews_cpu"]["previews"]
    assert data["meta"]["size"] == 64 and data["meta"]["steps"] == 2
    # The table prints from the JSON alone (a run cut short still has one).
    table = subprocess.run(
        [sys.executable, str(BENCH), "--table", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert table.returncode == 0 and "x plain" in table.stdout and "upscale_fewest_tiles" in table.stdout


@pytest.mark.slow
def test_tiny_bench_compiles_the_transformer_blocks(tmp_path: Path, tiny_model_dir: Path) -> None:
    # The compile_blocks section: COMPILE_SCOPE=blocks in its own process, checked against the
    # eager grid (vs_eager). Everything else is skipped to keep it short.
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), SDXL_HEALTH_FILE=str(tmp_path / "health.json"))
    others = (
        "compile_cold,compile_warm_cache,vae_float32,vae_float16,vae_bfloat16,cpu_postprocess,previews_gpu,"
        "previews_cpu,attention_flash,attention_efficient,attention_cudnn,draft,upscale_fewest_tiles,"
        "upscale_base_tiles"
    )
    result = subprocess.run(
        [
            sys.executable, str(BENCH), "--tiny", "--model-dir", str(tiny_model_dir), "--no-plain",
            "--runs", "1", "--steps", "2", "--threads", "1", "--compile-modes", "default",
            "--skip", others, "--json", str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sections = json.loads(out.read_text())["sections"]
    row = sections["compile_blocks"]
    assert "error" not in row, row
    assert row["compile_scope"] == "blocks" and row["first_grid_s"] > 0 and row["median_s"] > 0
    assert row["vs_eager"]["max_abs_diff"] <= 2, row["vs_eager"]
    assert "compile_cold" not in sections or "skipped" in sections["compile_cold"]


def test_table_shows_errors_and_skips(tmp_path: Path) -> None:
    path = tmp_path / "partial.json"
    path.write_text(
        json.dumps(
            {
                "meta": {"size": 1024, "steps": 25, "device": "GPU"},
                "sections": {
                    "plain": {"median_s": 6.0, "peak_gib": 12.0},
                    "fast": {"median_s": 3.0, "phases_s": {"denoise": 2.5}},
                    "compile_cold": {"error": "InductorError: no C compiler"},
                    "fp8": {"skipped": "budget: 10s left"},
                },
            }
        )
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    table = subprocess.run(
        [sys.executable, str(BENCH), "--table", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert table.returncode == 0, table.stderr
    fast = next(line for line in table.stdout.splitlines() if line.startswith("fast"))
    assert "2.00" in fast  # 6.0 s plain / 3.0 s
    assert "ERROR: InductorError" in table.stdout and "skipped: budget" in table.stdout


def test_engine_and_bench_import_without_the_worker_stack(tmp_path: Path) -> None:
    """The lent GPU machine has no Celery, Redis or database drivers: the bench must not need them."""
    path = tmp_path / "empty.json"
    path.write_text(json.dumps({"meta": {}, "sections": {}}))
    code = f"""
import importlib.abc, runpy, sys

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("celery", "kombu", "billiard", "redis", "sqlalchemy", "discord", "bot"):
            raise ImportError(f"{{name}} is not installed here")

sys.meta_path.insert(0, Absent())
import workers.sdxl.engine, workers.sdxl.health
sys.argv = ["bench_sdxl.py", "--table", {str(path)!r}]
runpy.run_path({str(BENCH)!r}, run_name="__main__")
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "configuration" in result.stdout


def test_the_quality_check_against_the_eager_grid(tmp_path: Path) -> None:
    import importlib.util

    from PIL import Image

    spec = importlib.util.spec_from_file_location("bench_sdxl", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    grid = [Image.new("RGB", (8, 8), (10 * i, 20, 30)) for i in range(4)]
    reference = tmp_path / "eager.npz"
    bench.save_reference(grid, reference)
    assert bench.compare_to_reference(grid, reference) == {"psnr_db": None, "max_abs_diff": 0}
    changed = [*grid[:3], Image.new("RGB", (8, 8), (0, 20, 30))]  # the last image 30 levels off in red
    found = bench.compare_to_reference(changed, reference)
    assert found["max_abs_diff"] == 30 and 20 < found["psnr_db"] < 60
    assert "error" in bench.compare_to_reference(grid[:2], reference)
