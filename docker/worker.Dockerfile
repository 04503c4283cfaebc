# The GPU worker image: CUDA PyTorch, diffusers and the OpenAI client. It never touches the
# database or Discord: it needs only the broker, the result backend and a model (SDXL_MODEL).
#
#   docker build -f docker/worker.Dockerfile -t mirage-worker .
#   docker run --gpus all -e BROKER_URL=... -e RESULT_BACKEND=... mirage-worker
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface \
    COMPILE_CACHE_DIR=/cache/torch-compile
WORKDIR /app

# Dependencies first (empty package stubs stand in for the source) so a code change does not
# reinstall diffusers. The base image's CUDA torch is pinned with a constraints file: without it
# a newer release anywhere in the dependency tree could make pip replace it with a different
# (possibly CPU-only or wrong-CUDA) build.
COPY pyproject.toml README.md ./
RUN python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > /tmp/torch.txt \
    && mkdir -p bot workers \
    && touch bot/__init__.py workers/__init__.py \
    && pip install -c /tmp/torch.txt ".[gpu,openai]" \
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

# One worker process per GPU; prefork (time limits need it), one job at a time.
CMD ["python", "-m", "workers", "worker", "--queues", "gpu", "--concurrency", "1"]
