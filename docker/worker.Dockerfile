# The worker image: CUDA PyTorch, diffusers and the OpenAI client. No database, no Discord token.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HF_HOME=/cache/huggingface TORCHINDUCTOR_CACHE_DIR=/cache/torch-compile
WORKDIR /app
COPY pyproject.toml README.md ./
COPY bot ./bot
COPY workers ./workers
# torch comes from the base image; the range in pyproject accepts it, so pip keeps it.
RUN pip install ".[gpu,openai]"
RUN useradd --create-home mirage && mkdir -p /cache && chown mirage /cache
USER mirage
CMD ["python", "-m", "workers", "worker", "--queues", "gpu"]
