python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
# The SDXL speed check on one lent GPU (H100 or H200), in under 8 minutes, from the repository root:
#
#   bash bench/gpu_check.sh            # full-size random-weight SDXL, every lever, compile, table
#   bash bench/gpu_check.sh --tiny     # the same path on the CPU with the tiny model (smoke test)
#
# The machine has Python, torch, transformers, accelerate, safetensors, Pillow and numpy but not
# diffusers or pydantic: the first line installs the wheels carried in .whl/ (see
# docker/worker-constraints.txt for the versions) into /tmp/site. Results: $OUT/bench_sdxl.json
# (rewritten after every section, so a run cut short keeps its numbers), bench_sdxl.log,
# table.txt, versions.txt and nvidia-smi.txt; $OUT defaults to ./gpu-check-out.
# Extra arguments go to bench/bench_sdxl.py.
set -uo pipefail
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
say() { echo "[gpu_check $(date +%T)] $*"; }

# diffusers 0.42 wants huggingface_hub >= 1.32 (transformers 5 takes any 1.x): an older one on the
# machine, or an engine that does not import, brings in the carried huggingface_hub 1.33.
SDXL_IMPORT="import huggingface_hub as h, packaging.version as v
assert v.Version(h.__version__) >= v.Version('1.32'), 'huggingface_hub ' + h.__version__ + ' < 1.32'
import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl, workers.sdxl.engine"
if ! python3 -c "$SDXL_IMPORT" 2>"$OUT/import_error.txt"; then
    say "the SDXL engine does not import ($(tail -n 1 "$OUT/import_error.txt")); adding the carried huggingface_hub"
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/fallback/*.whl
    if ! python3 -c "$SDXL_IMPORT" 2>>"$OUT/import_error.txt"; then
        cat "$OUT/import_error.txt"
        exit 1
    fi
fi

# torchao (FP8) goes into a folder of its own that only the FP8 process sees: a torchao built
# for another torch can then break that one measurement and nothing else.
FP8_ARGS=()
if compgen -G ".whl/optional/torchao-*.whl" >/dev/null; then
    if python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-ao .whl/optional/torchao-*.whl; then
        FP8_ARGS=(--fp8 --torchao-path /tmp/site-ao)
    fi
fi

python3 - >"$OUT/versions.txt" 2>&1 <<'EOF'
import platform, torch, diffusers, transformers, pydantic
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("diffusers", diffusers.__version__, "transformers", transformers.__version__, "pydantic", pydantic.__version__)
print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
EOF
cat "$OUT/versions.txt"
(nvidia-smi || true) >"$OUT/nvidia-smi.txt" 2>&1

# BENCH_BUDGET_S and BENCH_TIMEOUT_S stretch the run where a lease allows more than 8 minutes.
BUDGET_S="${BENCH_BUDGET_S:-400}"
TIMEOUT_S="${BENCH_TIMEOUT_S:-$((BUDGET_S + 50))}"
say "benchmark starts (budget $BUDGET_S s)"
# One timed grid per lever after its warm-up call (a GPU repeats itself closely), three for the
# baseline, the eager engine and the compiled one; compile gets at most 240 s per process.
timeout "$TIMEOUT_S" python3 bench/bench_sdxl.py --json "$OUT/bench_sdxl.json" --budget-s "$BUDGET_S" --runs 3 \
    --lever-runs 1 --child-timeout-s 240 "${FP8_ARGS[@]}" "$@" 2>&1 | tee "$OUT/bench_sdxl.log"
status=${PIPESTATUS[0]}
say "benchmark exited with $status"
# The table again from the JSON: it is there even when the benchmark was cut short.
python3 bench/bench_sdxl.py --table "$OUT/bench_sdxl.json" | tee "$OUT/table.txt"
exit "$status"
