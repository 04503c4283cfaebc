# The bot image: Discord, database, web gallery. No torch: it never generates images itself.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY bot ./bot
COPY workers ./workers
COPY migrations ./migrations
RUN pip install ".[openai]"
RUN useradd --create-home mirage && mkdir -p /app/data && chown mirage /app/data
USER mirage
EXPOSE 8080
CMD ["python", "-m", "bot"]
