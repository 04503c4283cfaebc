"""``python -m workers`` / ``mirage-worker``: run a worker, build the tiny test model, check config.

mirage-worker worker --queues gpu                 # prefork, 1 process (one worker per GPU)
mirage-worker worker --queues api                 # threads, 8 concurrent API jobs
mirage-worker make-tiny-model ./data/tiny-sdxl    # offline random-weight SDXL for tests
mirage-worker check                               # settings, broker, model, OpenAI key; exit 0/1
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from workers.schema import QUEUE_API, QUEUE_GPU

if TYPE_CHECKING:
    from celery import Celery

    from workers.settings import WorkerSettings

DEFAULT_CONCURRENCY = {"prefork": 1, "threads": 8, "solo": 1}


def default_pool(queues: Sequence[str]) -> str:
    """Threads for an API-only worker (I/O bound), prefork otherwise (time limits need it)."""
    return "threads" if queues and all(q == QUEUE_API for q in queues) else "prefork"


def worker_argv(
    queues: Sequence[str],
    *,
    pool: str | None = None,
    concurrency: int | None = None,
    loglevel: str = "INFO",
    hostname: str | None = None,
) -> list[str]:
    """The ``celery worker`` arguments for these choices."""
    pool = pool or default_pool(queues)
    concurrency = concurrency or DEFAULT_CONCURRENCY.get(pool, 1)
    # A distinct node name per queue set, so a gpu and an api worker on one host do not clash
    # in remote control (ping, revoke replies).
    hostname = hostname or f"mirage-{'-'.join(queues)}@{socket.gethostname()}"
    return [
        "worker",
        f"--queues={','.join(queues)}",
        f"--pool={pool}",
        f"--concurrency={concurrency}",
        f"--loglevel={loglevel}",
        f"--hostname={hostname}",
    ]


def _parse_queues(text: str) -> list[str]:
    queues = [q.strip() for q in text.split(",") if q.strip()]
    if not queues:
        raise argparse.ArgumentTypeError("at least one queue is needed, e.g. gpu or gpu,api")
    return queues


def cmd_worker(args: argparse.Namespace) -> int:
    """Start a Celery worker in this process (blocks until it shuts down)."""
    from workers.celery_app import app

    queues: list[str] = args.queues
    if args.pool in ("threads", "solo") and QUEUE_GPU in queues:
        logging.getLogger(__name__).warning(
            "the %s pool cannot enforce time limits; use prefork for the gpu queue", args.pool
        )
    app.worker_main(
        worker_argv(
            queues,
            pool=args.pool,
            concurrency=args.concurrency,
            loglevel=args.loglevel,
            hostname=args.hostname,
        )
    )
    return 0


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    """Write the tiny random-weight SDXL used by tests and CPU smoke runs."""
    from workers.sdxl.tiny import make_tiny_model

    path = make_tiny_model(Path(args.dir))
    print(path)
    return 0


def _check_broker(app: Celery) -> str | None:
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=5)
    except Exception as exc:
        return f"broker unreachable: {type(exc).__name__}: {exc}"
    return None


def _check_backend(app: Celery) -> str | None:
    # One attempt: the workers retry backend writes for minutes, a health check should not.
    app.conf.result_backend_always_retry = False
    try:
        app.backend.get_task_meta("mirage-check-nonexistent")
    except Exception as exc:
        return f"result backend unreachable: {type(exc).__name__}: {exc}"
    return None


def _gpu_stack_installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("torch", "diffusers"))


def _check_model(settings: WorkerSettings) -> str | None:
    """Whether ``SDXL_MODEL`` loads here: None when it does, else a one-line reason.

    A live worker on this machine that has it loaded (its health file says so) answers without a
    second copy in memory. Otherwise the model is loaded in this process, without the warm-up,
    and with a health file of its own so the worker's is left alone.
    """
    from workers.sdxl import health

    state = health.health()
    if state["ok"] and state.get("model") == settings.sdxl_model:
        print(f"SDXL model {settings.sdxl_model} loaded by worker process {state.get('pid')}")
        return None
    if not _gpu_stack_installed():
        return "SDXL model: torch and diffusers are not installed (pip install torch -e '.[gpu]')"
    import os
    import tempfile

    print(f"loading SDXL model {settings.sdxl_model} to check it...", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="mirage-check-") as folder:
        os.environ[health.ENV_HEALTH_FILE] = str(Path(folder) / "health.json")
        try:
            from workers.schema import WorkerError
            from workers.sdxl.engine import SDXLEngine

            engine = SDXLEngine.load(settings.model_copy(update={"warmup": False}))
        except WorkerError as exc:
            return f"SDXL model: {exc.message}"
        except Exception as exc:
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return f"SDXL model: {type(exc).__name__}: {text}"[:300]
    dtype = str(engine.dtype).removeprefix("torch.")
    print(f"SDXL model {settings.sdxl_model} loads on {engine.device} ({dtype})")
    return None


def printable_settings(settings: WorkerSettings) -> dict[str, object]:
    """The settings as ``check`` prints them: secrets masked, and the password of every URL.

    Every URL-shaped value, not only the broker's: ``OPENAI_RATE_LIMIT_STORAGE`` is a Redis URL
    and ``OPENAI_BASE_URL`` may name a proxy with credentials.
    """
    from kombu.utils.url import maybe_sanitize_url

    config = settings.model_dump(mode="json")  # SecretStr dumps as '**********'
    return {
        key: maybe_sanitize_url(value) if isinstance(value, str) else value for key, value in config.items()
    }


def cmd_check(args: argparse.Namespace) -> int:
    """Print the configuration with secrets masked, then check the broker, backend, model and OpenAI key.

    The SDXL model is loaded when the ``gpu`` queue is checked: ``--queues`` naming it, or no
    ``--queues`` on a machine with torch and diffusers installed (``--skip-model`` skips it).
    Each problem is one ``FAIL:`` line on stderr; the exit status is 1 when there is any.
    """
    from pydantic import ValidationError

    from workers.settings import WorkerSettings

    try:
        settings = WorkerSettings()
    except ValidationError as exc:
        print(f"invalid settings:\n{exc}", file=sys.stderr)
        return 1
    print(json.dumps(printable_settings(settings), indent=2, default=str))

    problems: list[str] = []
    try:
        # make_celery validates the time limits; importing celery_app builds the default app too.
        from workers.celery_app import make_celery
        from workers.celery_config import prepare_local_storage

        app = make_celery(settings)
        prepare_local_storage(settings)
    except ValueError as exc:
        print(f"FAIL: {exc}", file=sys.stderr)
        return 1
    for problem in (_check_broker(app), _check_backend(app)):
        if problem:
            problems.append(problem)
    queues: list[str] = args.queues or []
    wants_model = QUEUE_GPU in queues or (not queues and _gpu_stack_installed())
    if wants_model and not args.skip_model:
        problem = _check_model(settings)
        if problem:
            problems.append(problem)
    wants_openai = QUEUE_API in queues or (not queues and settings.openai_api_key.get_secret_value())
    if wants_openai:
        from workers.openai_engine import check_credentials

        message = check_credentials(settings)
        if message:
            problems.append(message)
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    if not problems:
        print("OK")
    return 1 if problems else 0


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(prog="mirage-worker", description="Mirage image workers.")
    sub = parser.add_subparsers(dest="command", required=True)

    worker = sub.add_parser("worker", help="run a Celery worker")
    worker.add_argument("--queues", "-Q", type=_parse_queues, default=[QUEUE_GPU], help="gpu, api or gpu,api")
    worker.add_argument("--concurrency", "-c", type=int, default=None, help="processes/threads")
    worker.add_argument(
        "--pool", "-P", choices=["prefork", "threads", "solo"], default=None,
        help="default: threads for api only, else prefork",
    )  # fmt: skip
    worker.add_argument("--loglevel", "-l", default="INFO")
    worker.add_argument("--hostname", "-n", default=None, help="node name, default mirage-<queues>@<host>")
    worker.set_defaults(func=cmd_worker)

    tiny = sub.add_parser("make-tiny-model", help="write the tiny random SDXL into DIR")
    tiny.add_argument("dir")
    tiny.set_defaults(func=cmd_make_tiny_model)

    check = sub.add_parser("check", help="print settings (secrets masked) and check connectivity")
    check.add_argument(
        "--queues", "-Q", type=_parse_queues, default=None,
        help="check what these queues need (gpu: the SDXL model, api: the OpenAI key)",
    )  # fmt: skip
    check.add_argument("--skip-model", action="store_true", help="do not load the SDXL model")
    check.set_defaults(func=cmd_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m workers`` and the ``mirage-worker`` console script."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
