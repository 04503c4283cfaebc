"""The OpenAI image engine (queue ``api``): DALL-E 3, DALL-E 2 and GPT image models.

The Celery task uses ``OpenAIEngine.load(settings)`` once per worker process and
``engine.run(request, progress, cancelled)`` per job; ``check_credentials`` tells admins at
start whether the key works.
"""

from workers.openai_engine.engine import OpenAIEngine, check_credentials, make_client
from workers.openai_engine.models import DEFAULT_MODEL, EDIT_FALLBACK_MODEL, MODELS, ModelSpec, model_spec
from workers.openai_engine.ratelimit import RateLimiter, shared_rate_limiter

__all__ = [
    "DEFAULT_MODEL",
    "EDIT_FALLBACK_MODEL",
    "MODELS",
    "ModelSpec",
    "OpenAIEngine",
    "RateLimiter",
    "check_credentials",
    "make_client",
    "model_spec",
    "shared_rate_limiter",
]
