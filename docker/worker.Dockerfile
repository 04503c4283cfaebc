# The GPU worker image: CUDA PyTorch, diffusers and the OpenAI client. It never touches the
# database or Discord: it needs only the broker, the result backend and a model (SDXL_MODEL).
#
#   docker build -f docker/worker.Dockerfile -t mirage-worker .
#   docker run --gpus all -e BROKER_URL=... -e RESULT_BACKEND=... mirage-worker
#
# torch comes from the base image and is the version README, pyproject's gpu extra and
# docker/worker-constraints.txt name (a test keeps them in agreement). CUDA 12.8 runs on NVIDIA
# drivers from 570 on.
FROM pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    HF_HOME=/cache/huggingface \
    COMPILE_CACHE_DIR=/cache/torch-compile \
    SDXL_HEALTH_FILE=/tmp/mirage-sdxl-health.json
WORKDIR /app

# torch.compile (TORCH_COMPILE=true) builds its kernels with a C compiler and the Python headers;
# the runtime base image has neither, and without them a compiled worker would fail to start.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ python3-dev \
    && rm -rf /var/lib/apt/lists/*

# Dependencies first (empty package stubs stand in for the source) so a code change does not
# reinstall diffusers. Every version comes from the constraints file, torch included: its pin
# must be the base image's build (checked first), so pip never replaces the CUDA torch with
# another build, and the image resolves the same packages on every build.
COPY pyproject.toml README.md ./
COPY docker/worker-constraints.txt /tmp/worker-constraints.txt
RUN python -c "import sys, torch; pin = next(l for l in open('/tmp/worker-constraints.txt') if l.startswith('torch==')).split('==')[1].strip(); have = torch.__version__.split('+')[0]; sys.exit(0 if have == pin else f'base image torch {have} != constraints {pin}')" \
    && mkdir -p bot workers \
    && touch bot/__init__.py workers/__init__.py \
    && pip install -c /tmp/worker-constraints.txt ".[gpu,openai]" \
    && pip uninstall -y mirage-bot \
    && rm -rf bot workers build ./*.egg-info

# Only the workers package: the workers import nothing from bot/ (no Discord, no database code).
COPY workers ./workers
RUN pip install --no-deps . && rm -rf build ./*.egg-info

# The caches live on named volumes; creating the folders here, owned by the worker's user, makes
# a new volume inherit that owner (else it is root's and downloads fail). /models is where the
# compose file mounts local weights, embeddings and LoRAs read-only.
RUN useradd --create-home --uid 10001 mirage \
    && mkdir -p /cache/huggingface /cache/torch-compile /models \
    && chown -R mirage /cache
USER mirage

# One worker process per GPU; prefork (time limits need it), one job at a time. Health: the
# compose files ping the worker and run `python -m workers.sdxl.health` (model loaded).
CMD ["python", "-m", "workers", "worker", "--queues", "gpu", "--concurrency", "1"]
