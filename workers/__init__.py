"""Mirages Discord bot: commands, buttons, credits, job records, galleries and delivery.' > bot/__init__.py
echo 'Mirages stateless compute: Celery tasks that turn job messages into images."""
