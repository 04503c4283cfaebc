"""The worker's Celery configuration (``workers.celery_config``) and app factory; no worker runs here."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from workers.__main__ import worker_argv
from workers.celery_app import make_celery
from workers.celery_config import (
    DURABLE_SQLA,
    broker_transport_options,
    prepare_local_storage,
    worker_broker_url,
)
from workers.runtime import WorkerRuntime, runtime_of, settings_of
from workers.schema import QUEUE_API, QUEUE_GPU, TASK_OPENAI, TASK_SDXL
from workers.settings import WorkerSettings

REPO = Path(__file__).resolve().parents[1]


def _settings(**overrides: Any) -> WorkerSettings:
    values: dict[str, Any] = {
        "broker_url": "redis://127.0.0.1:6379/0",
        "result_backend": "redis://127.0.0.1:6379/1",
        "warmup": False,
    }
    values.update(overrides)
    return WorkerSettings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
def redis_app() -> Iterator[Celery]:
    app = make_celery(_settings())
    yield app
    app.close()


# --------------------------------------------------------------------------- configuration


def test_tasks_are_routed_to_their_queues(redis_app: Celery) -> None:
    routes = redis_app.conf.task_routes
    assert routes[TASK_SDXL] == {"queue": QUEUE_GPU}
    assert routes[TASK_OPENAI] == {"queue": QUEUE_API}
    assert redis_app.amqp.router.route({}, TASK_SDXL)["queue"].name == QUEUE_GPU
    assert redis_app.amqp.router.route({}, TASK_OPENAI)["queue"].name == QUEUE_API


def test_both_tasks_are_registered_by_name(redis_app: Celery) -> None:
    redis_app.loader.import_default_modules()
    assert {TASK_SDXL, TASK_OPENAI} <= set(redis_app.tasks)


def test_reliability_settings(redis_app: Celery) -> None:
    conf = redis_app.conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.worker_deduplicate_successful_tasks is True
    assert conf.task_track_started is True
    assert conf.result_extended is True


def test_time_limits_and_visibility_timeout(redis_app: Celery) -> None:
    conf = redis_app.conf
    settings = _settings()
    assert conf.task_soft_time_limit == settings.task_soft_time_limit_s
    assert conf.task_time_limit == settings.task_time_limit_s
    assert conf.task_soft_time_limit < conf.task_time_limit
    visibility = conf.broker_transport_options["visibility_timeout"]
    assert visibility == settings.visibility_timeout_s
    assert visibility > conf.task_time_limit
    # kombu's default sweep for abandoned messages is ~100 s; ours follows the timeout.
    assert conf.broker_transport_options["unacked_restore_throttle"] == 1


def test_json_only(redis_app: Celery) -> None:
    conf = redis_app.conf
    assert conf.task_serializer == "json"
    assert conf.result_serializer == "json"
    assert list(conf.accept_content) == ["json"]
    assert list(conf.result_accept_content) == ["json"]


def test_each_app_owns_a_runtime_made_from_its_settings() -> None:
    first = make_celery(_settings(max_redeliveries=5))
    second = make_celery(_settings(max_redeliveries=1))
    assert settings_of(first).max_redeliveries == 5
    assert settings_of(second).max_redeliveries == 1
    assert isinstance(runtime_of(first), WorkerRuntime)
    assert runtime_of(first) is runtime_of(first)
    assert runtime_of(first) is not runtime_of(second)  # no state shared between apps


def test_a_foreign_app_gets_a_runtime_from_the_process_settings() -> None:
    foreign = Celery("other", set_as_current=False)
    assert runtime_of(foreign) is runtime_of(foreign)


@pytest.mark.parametrize(
    ("soft", "hard", "visibility"),
    [(100, 100, 500), (200, 100, 500), (10, 100, 100), (10, 100, 50)],
)
def test_inconsistent_limits_are_refused(soft: int, hard: int, visibility: int) -> None:
    with pytest.raises(ValueError):
        make_celery(
            _settings(task_soft_time_limit_s=soft, task_time_limit_s=hard, visibility_timeout_s=visibility)
        )


def test_only_the_durable_transport_gets_a_visibility_timeout(tmp_path: Path) -> None:
    # kombu's stock sqla transport hands every transport option to create_engine: a
    # visibility_timeout there would break it. The durable one filters it out and uses it.
    stock = f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    assert broker_transport_options(stock, 1800) == {"connect_args": {"timeout": 30}}
    durable = broker_transport_options(worker_broker_url(stock), 1800)
    assert durable == {"connect_args": {"timeout": 30}, "visibility_timeout": 1800}
    app = make_celery(_settings(broker_url=stock, visibility_timeout_s=1800))
    assert app.conf.broker_transport_options == durable


def test_worker_uses_the_durable_transport_only_for_sqla() -> None:
    assert worker_broker_url("sqla+sqlite:///./data/broker.db") == "mirage-sqla+sqlite:///./data/broker.db"
    assert worker_broker_url("redis://localhost:6379/0") == "redis://localhost:6379/0"
    app = make_celery(_settings(broker_url="sqla+sqlite:///./data/broker.db"))
    assert app.connection_for_write().transport_cls == DURABLE_SQLA


def test_embedded_defaults_make_their_folder_and_use_wal(tmp_path: Path) -> None:
    broker = tmp_path / "nested" / "broker.db"
    results = tmp_path / "nested" / "results.db"
    settings = _settings(broker_url=f"sqla+sqlite:///{broker}", result_backend=f"db+sqlite:///{results}")
    make_celery(settings)
    assert not broker.parent.exists()  # importing or configuring the app creates nothing
    prepare_local_storage(settings)  # what a starting worker does
    with sqlite3.connect(results) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_importing_the_worker_modules_does_not_import_torch() -> None:
    code = (
        "import sys, workers.schema, workers.celery_app, workers.tasks, workers.progress, workers.__main__,"
        " workers.results, workers.runtime, workers.redelivery, workers.cancellation, workers.sql_transport;"
        "assert 'torch' not in sys.modules, 'torch imported';"
        "assert 'diffusers' not in sys.modules, 'diffusers imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


@pytest.mark.parametrize(
    ("queues", "pool", "concurrency"),
    [(["gpu"], "prefork", 1), (["api"], "threads", 8), (["gpu", "api"], "prefork", 1)],
)
def test_worker_command_defaults(queues: list[str], pool: str, concurrency: int) -> None:
    argv = worker_argv(queues)
    assert argv[0] == "worker"
    assert f"--pool={pool}" in argv
    assert f"--concurrency={concurrency}" in argv
    assert f"--queues={','.join(queues)}" in argv


# --------------------------------------------------------------------------- the check command


def _check(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {
        k: v for k, v in os.environ.items() if not k.startswith(("BROKER", "RESULT", "OPENAI", "CELERY"))
    }
    environ.update(PYTHONPATH=str(REPO), **env)
    return subprocess.run(
        [sys.executable, "-m", "workers", "check"],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_check_passes_on_the_embedded_defaults(tmp_path: Path, tiny_model_dir: Path) -> None:
    done = _check(
        tmp_path, SDXL_MODEL=str(tiny_model_dir), DEVICE="cpu", SDXL_HEALTH_FILE=str(tmp_path / "h")
    )
    assert done.returncode == 0, done.stderr
    assert "OK" in done.stdout
    assert f"SDXL model {tiny_model_dir} loads on cpu (float32)" in done.stdout
    assert (tmp_path / "data" / "broker.db").exists()
    assert not (tmp_path / "h").exists()  # the check's load leaves the worker's health file alone


def test_check_fails_in_one_line_when_the_model_cannot_load(tmp_path: Path) -> None:
    """The newcomer's first command says what is wrong with the model, and exits 1."""
    done = _check(tmp_path, SDXL_MODEL=str(tmp_path / "no-such-model"), SDXL_HEALTH_FILE=str(tmp_path / "h"))
    assert done.returncode == 1
    fails = [line for line in done.stderr.splitlines() if line.startswith("FAIL:")]
    assert fails == [
        f"FAIL: SDXL model: SDXL model folder {str(tmp_path / 'no-such-model')!r} does not exist."
    ]
    assert "Traceback" not in done.stderr


def test_check_skips_the_model_when_asked(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "workers", "check", "--skip-model"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "SDXL_MODEL": str(tmp_path / "none"), "BROKER_URL": "",
             "RESULT_BACKEND": ""},
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "SDXL model" not in done.stdout + done.stderr


def test_check_fails_on_an_unreachable_broker_and_masks_secrets(tmp_path: Path) -> None:
    done = _check(
        tmp_path,
        BROKER_URL="redis://:hunter2@127.0.0.1:1/0",
        RESULT_BACKEND="redis://:hunter2@127.0.0.1:1/1",
        OPENAI_API_KEY="sk-test-very-secret",
        OPENAI_BASE_URL="http://127.0.0.1:1/v1",
    )
    assert done.returncode == 1
    output = done.stdout + done.stderr
    assert "broker unreachable" in output
    assert "hunter2" not in output
    assert "sk-test-very-secret" not in output


def test_check_masks_the_password_of_every_url_it_prints(tmp_path: Path) -> None:
    # Not only the broker and result backend are URLs that may carry a password.
    done = _check(
        tmp_path,
        BROKER_URL="redis://:hunter2@127.0.0.1:1/0",
        RESULT_BACKEND="redis://:hunter2@127.0.0.1:1/1",
        OPENAI_RATE_LIMIT_STORAGE="redis://:limiter-pw@127.0.0.1:1/2",
        OPENAI_BASE_URL="https://proxy-user:proxy-pw@127.0.0.1:1/v1",
    )
    output = done.stdout + done.stderr
    assert "limiter-pw" not in output and "proxy-pw" not in output
    assert '"openai_rate_limit_storage": "redis://:**@127.0.0.1:1/2"' in done.stdout  # still useful
