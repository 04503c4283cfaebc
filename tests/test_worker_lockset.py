"""The GPU worker's locked package set installs into a fresh virtualenv and loads the model.

The install mirrors docker/worker.Dockerfile's (``pip install -c docker/worker-constraints.txt
".[gpu,openai]"``) with one change: the CPU build of torch stands in for the base image's CUDA
build, so the constraints' ``torch==`` line is the only one left out. The model is then loaded by
the real code, ``python -m workers check``, from outside the repository, so it is the installed
package that runs, with exactly the pinned versions.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "docker" / "worker-constraints.txt"
CPU_TORCH = "2.13.0"  # the CPU build CI installs (.ci/run); the image's CUDA build is the pin


def _run(args: list[str | Path], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run(
        [str(arg) for arg in args],
        cwd=cwd,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, f"{args[1:4]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _pins(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line.strip())
        if match:
            pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def test_the_locked_worker_set_installs_fresh_and_loads_the_model(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=tmp_path)
    python = venv / "bin" / "python"
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(
        "".join(line for line in CONSTRAINTS.read_text().splitlines(True) if not line.startswith("torch=="))
    )
    _run([python, "-m", "pip", "install", "-q", f"torch=={CPU_TORCH}"], cwd=tmp_path)
    _run([python, "-m", "pip", "install", "-q", "-c", constraints, f"{ROOT}[gpu,openai]"], cwd=tmp_path)

    installed = _pins(_run([python, "-m", "pip", "freeze"], cwd=tmp_path).stdout)
    pinned = _pins(constraints.read_text())
    wrong = {
        name: (installed[name], version)
        for name, version in pinned.items()
        if installed.get(name, version) != version
    }
    assert not wrong, f"installed versions differ from the pins (installed, pinned): {wrong}"
    assert installed["diffusers"] == pinned["diffusers"] and installed["torch"].startswith(CPU_TORCH)

    where = _run([python, "-c", "import workers; print(workers.__file__)"], cwd=tmp_path).stdout
    assert str(venv) in where  # the installed package, not the checkout
    checked = _run(
        [python, "-m", "workers", "check", "--queues", "gpu"], cwd=tmp_path, SDXL_MODEL=str(tiny_model_dir)
    )
    assert f"SDXL model {tiny_model_dir} loads on cpu" in checked.stdout + checked.stderr
