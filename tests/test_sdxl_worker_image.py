"""The GPU worker image resolves one known set of packages, and its health check means "model loaded".

One torch version across the worker Dockerfile's base image, its constraints file, pyproject's
``gpu`` extra and the README's install line; every package the image installs pinned by the
constraints; the health module true only after a successful load by a live process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "worker.Dockerfile"
CONSTRAINTS = ROOT / "docker" / "worker-constraints.txt"


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        specs = list(requirement.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"not an exact pin: {line}"
        name = canonicalize_name(requirement.name)
        assert name not in pins, f"pinned twice: {name}"
        pins[name] = specs[0].version
    return pins


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _image_extras() -> list[str]:
    text = DOCKERFILE.read_text()
    match = re.search(r'pip install -c \S+ "\.\[([\w,]+)\]"', text)
    assert match, "the worker image installs the project's extras with the constraints file"
    return match.group(1).split(",")


def _base_torch() -> str:
    base = next(line for line in DOCKERFILE.read_text().splitlines() if line.startswith("FROM "))
    match = re.fullmatch(r"FROM pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-runtime", base.strip())
    assert match, f"unexpected base image: {base}"
    return match.group(1)


def test_one_torch_version_everywhere() -> None:
    torch_version = _base_torch()
    assert _pins()["torch"] == torch_version
    gpu = [Requirement(r) for r in _pyproject()["optional-dependencies"]["gpu"]]
    torch_req = next(r for r in gpu if r.name == "torch")
    assert Version(torch_version) in torch_req.specifier
    assert Version("2.6") in torch_req.specifier, "diffusers and transformers 5 need torch 2.6 or newer"
    readme = (ROOT / "README.md").read_text()
    assert set(re.findall(r"torch==([\d.]+)", readme)) == {torch_version}


def test_constraints_pin_everything_the_image_installs() -> None:
    pins = _pins()
    project = _pyproject()
    requirements = list(project["dependencies"])
    for extra in _image_extras():
        requirements += project["optional-dependencies"][extra]
    for text in requirements:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is installed by the worker image but not pinned in {CONSTRAINTS.name}"
        assert Version(pins[name]) in requirement.specifier, f"{name}=={pins[name]} does not satisfy {text}"
    # torch's CUDA libraries belong to the base image; pinning them could swap its build.
    assert not any(name.startswith("nvidia-") or name == "triton" for name in pins)


def test_image_checks_its_torch_and_can_compile() -> None:
    text = DOCKERFILE.read_text()
    assert "COPY docker/worker-constraints.txt" in text
    assert "base image torch" in text  # the build stops when the base image's torch is not the pin
    assert re.search(r"apt-get install[^\n]*\bg\+\+", text), "torch.compile needs a C compiler"


def test_compose_health_checks_ask_for_the_model() -> None:
    for path in (ROOT / "docker-compose.yml", ROOT / "docker" / "gpu-worker.compose.yml"):
        text = path.read_text()
        gpu_service = text[text.index("worker-gpu:") :]
        check = re.search(r"test: \[\"CMD-SHELL\", \"([^\"]+)\"\]", gpu_service)
        assert check and check.group(1).endswith("&& python -m workers.sdxl.health"), path.name


# --------------------------------------------------------------------------------- health


@pytest.fixture
def health_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "health.json"
    monkeypatch.setenv("SDXL_HEALTH_FILE", str(path))
    return path


def _check(path: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SDXL_HEALTH_FILE=str(path), PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "workers.sdxl.health"], capture_output=True, text=True, env=env, timeout=60
    )


def test_no_load_yet_is_unhealthy(health_file: Path) -> None:
    from workers.sdxl import health

    assert not health.model_loaded()
    result = _check(health_file)
    assert result.returncode == 1 and "no SDXL model load recorded" in result.stdout


def test_loaded_model_is_healthy_and_a_failed_load_is_not(health_file: Path, tiny_model_dir: Path) -> None:
    pytest.importorskip("diffusers")
    from workers.schema import WorkerError
    from workers.sdxl import health
    from workers.sdxl.engine import SDXLEngine
    from workers.settings import WorkerSettings

    settings = WorkerSettings(_env_file=None, sdxl_model=str(tiny_model_dir), warmup=False)  # type: ignore[call-arg]
    SDXLEngine.load(settings)
    assert health.model_loaded()
    state = health.health()
    assert state["status"] == "loaded" and state["pid"] == os.getpid()
    result = _check(health_file)
    assert result.returncode == 0 and result.stdout.startswith("OK:")

    broken = WorkerSettings(_env_file=None, sdxl_model=str(tiny_model_dir / "missing"))  # type: ignore[call-arg]
    with pytest.raises(WorkerError):
        SDXLEngine.load(broken)
    assert not health.model_loaded()
    assert "does not exist" in health.health()["reason"]
    assert _check(health_file).returncode == 1


def test_a_dead_loader_is_unhealthy(health_file: Path) -> None:
    from workers.sdxl import health

    child = subprocess.run(
        [sys.executable, "-c", "from workers.sdxl import health; health.record(health.LOADED, model='m')"],
        env=dict(os.environ, SDXL_HEALTH_FILE=str(health_file), PYTHONPATH=str(ROOT)),
        timeout=60,
        check=True,
    )
    assert child.returncode == 0
    state = health.health()
    assert not state["ok"] and "is gone" in state["reason"]
