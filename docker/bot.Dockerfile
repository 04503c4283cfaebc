# The bot image: Discord, database, web gallery, migrations. No torch: it never generates images.
# The same small image also runs the API worker (OpenAI calls need no torch) and Flower, so a
# host without a GPU never has to build or pull the multi-gigabyte CUDA image.
#
#   docker build -f docker/bot.Dockerfile -t mirage-bot .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

# Dependencies first, from pyproject alone (empty package stubs stand in for the source), so a
# code change rebuilds only the last layers. Extras: openai (API worker), s3 (media store on
# S3-compatible storage), flower (the monitoring profile). Never gpu: that would pull torch.
COPY pyproject.toml README.md ./
RUN mkdir -p bot workers \
    && touch bot/__init__.py workers/__init__.py \
    && pip install ".[openai,s3,flower]" \
    && pip uninstall -y mirage-bot \
    && rm -rf bot workers build ./*.egg-info

COPY alembic.ini ./
COPY migrations ./migrations
COPY workers ./workers
COPY bot ./bot
RUN pip install --no-deps . && rm -rf build ./*.egg-info

# An unprivileged user; /app/data is where the media volume mounts (a new named volume takes
# this directory's owner, so the bot can write images there).
RUN useradd --create-home --uid 10001 mirage \
    && mkdir -p /app/data/media \
    && chown -R mirage /app/data
USER mirage

EXPOSE 8080
CMD ["python", "-m", "bot"]
