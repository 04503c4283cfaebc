"""Mirage's stateless compute: Celery tasks that turn job messages into images."""
