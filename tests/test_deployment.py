"""The deployment files stay honest without a Docker engine.

Compose files, Dockerfiles and ``.env.example`` are checked against the code they deploy: every
command is a real entry point, every environment variable is a setting the code reads (with the
code's default), ``.env.example`` lists exactly the settings, the bot image never installs torch.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, SecretStr, ValidationError
from pydantic_settings import BaseSettings

from bot.settings import BotSettings
from workers.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
GPU_WORKER_COMPOSE = ROOT / "docker" / "gpu-worker.compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
BOT_DOCKERFILE = ROOT / "docker" / "bot.Dockerfile"
WORKER_DOCKERFILE = ROOT / "docker" / "worker.Dockerfile"

OUR_IMAGES = {"mirage-bot": BOT_DOCKERFILE, "mirage-worker": WORKER_DOCKERFILE}
BOT_FIELDS = {name.upper() for name in BotSettings.model_fields}
WORKER_FIELDS = {name.upper() for name in WorkerSettings.model_fields}
ALL_FIELDS = BOT_FIELDS | WORKER_FIELDS
# What a worker must never be handed: it needs no Discord, no database, no media store.
NOT_FOR_WORKERS = {
    "DISCORD_TOKEN",
    "DATABASE_URL",
    "S3_ACCESS_KEY",
    "S3_SECRET_KEY",
    "MEDIA_DIR",
    "MEDIA_BACKEND",
}
# Compose-only variables (interpolated into the file, never into a container): each is documented
# in docs/deploy.md.
COMPOSE_ONLY_VARS = {"MIRAGE_GPU"}
# Settings whose compose default is a path inside the container rather than the code's default.
CONTAINER_PATH_DEFAULTS = {
    "EMBEDDINGS_DIR": "/models/embeddings",
    "LORAS_DIR": "/models/loras",
    "COMPILE_CACHE_DIR": "/cache/torch-compile",
}
EXAMPLE_REQUIRED = {"BROKER_URL": "redis://main-host:6379/0", "RESULT_BACKEND": "redis://main-host:6379/1"}

_VAR_RE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


# --------------------------------------------------------------------------- helpers


def load_compose(path: Path) -> dict[str, Any]:
    """A compose file as data (anchors and ``<<`` merges resolved by PyYAML)."""
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), path
    return data


def services(path: Path = COMPOSE) -> dict[str, dict[str, Any]]:
    """The services of a compose file."""
    return load_compose(path)["services"]


def environment(service: dict[str, Any]) -> dict[str, str | None]:
    """A service's ``environment`` as a mapping (list syntax normalised; None: passed only if set)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) if "=" in item else (item, None) for item in env)
        return {key: value for key, value in pairs}
    return {key: (None if value is None else str(value)) for key, value in env.items()}


def resolve(value: str) -> str:
    """``value`` with compose interpolation applied as if no variable were set.

    ``${VAR:-default}`` gives its default; ``${VAR:?message}`` (required) gives a sample value.
    """

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3) or ""
        if op in (":-", "-"):
            return arg
        if op in (":?", "?"):
            return EXAMPLE_REQUIRED[name]
        raise AssertionError(f"${{{name}}} without a default: unset it becomes an empty string")

    return _VAR_RE.sub(one, value).replace("$$", "$")


def is_ours(service: dict[str, Any]) -> bool:
    """Whether a service runs one of Mirage's images (not postgres or redis)."""
    return str(service.get("image", "")).split(":")[0] in OUR_IMAGES


def settings_class(service: dict[str, Any]) -> type[BaseSettings]:
    """Which settings class a service's command reads."""
    command = service_command(service)
    if command[:3] == ["python", "-m", "bot"] or command[:1] == ["alembic"]:
        return BotSettings
    return WorkerSettings  # python -m workers, celery -A workers.celery_app


def service_command(service: dict[str, Any]) -> list[str]:
    """The service's command, or its image's CMD."""
    command = service.get("command")
    if command is None:
        command = dockerfile_cmd(OUR_IMAGES[service["image"]])
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def field_default(model: type[BaseModel], name: str) -> Any:
    """A settings field's default value."""
    return model.model_fields[name.lower()].get_default(call_default_factory=True)


def plain(value: Any) -> Any:
    """A comparable form of a setting's value (secrets unwrapped, enums and paths as text)."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value.value if hasattr(value, "value") else value


def annotation_text(model: type[BaseModel], name: str) -> str:
    """A field's annotation as written in the source (``from __future__ import annotations``)."""
    annotation = model.model_fields[name.lower()].annotation
    return str(annotation)


# --------------------------------------------------------------------------- Dockerfiles


@dataclass
class Instruction:
    """One Dockerfile instruction, continuation lines joined."""

    keyword: str
    args: str


def dockerfile(path: Path) -> list[Instruction]:
    """Parse a Dockerfile into instructions (comments dropped, ``\\`` continuations joined)."""
    logical: list[str] = []
    current = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    assert not current, f"{path} ends inside a continued line"
    result = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        result.append(Instruction(keyword.upper(), args.strip()))
    return result


def dockerfile_cmd(path: Path) -> list[str]:
    """The exec-form CMD of a Dockerfile."""
    cmds = [ins for ins in dockerfile(path) if ins.keyword == "CMD"]
    assert len(cmds) == 1, f"{path}: one CMD expected"
    command = json.loads(cmds[0].args)
    assert isinstance(command, list), "exec form, so signals reach the process"
    return command


def pip_extras(path: Path) -> set[str]:
    """The extras of the project (``.[a,b]``) that a Dockerfile's pip installs request."""
    extras: set[str] = set()
    for ins in dockerfile(path):
        if ins.keyword == "RUN" and "pip install" in ins.args:
            for group in re.findall(r"\"?\.\[([^\]]*)\]\"?", ins.args):
                extras.update(part.strip() for part in group.split(",") if part.strip())
    return extras


def pyproject() -> dict[str, Any]:
    """pyproject.toml."""
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# --------------------------------------------------------------------------- entry points


def check_entry_point(command: list[str]) -> None:
    """Fail unless ``command`` runs a real entry point of this project with arguments it accepts."""
    if command[:2] == ["python", "-m"]:
        module, args = command[2], command[3:]
        main_file = ROOT / module.replace(".", "/") / "__main__.py"
        assert main_file.is_file(), f"python -m {module}: no {main_file.relative_to(ROOT)}"
        tree = ast.parse(main_file.read_text())
        functions = {
            node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        }
        assert "main" in functions, f"{main_file.relative_to(ROOT)} defines no main()"
        guards = [
            node
            for node in tree.body
            if isinstance(node, ast.If)
            and "__main__" in ast.unparse(node.test)
            and "main(" in ast.unparse(node)
        ]
        assert guards, f"{main_file.relative_to(ROOT)} never calls main() under __name__ == '__main__'"
        if module == "workers":
            from workers.__main__ import build_parser

            parsed = build_parser().parse_args(args)  # SystemExit (a test error) if rejected
            assert callable(parsed.func)
        elif module == "bot":
            assert not args, "python -m bot takes no arguments in the images"
        else:
            raise AssertionError(f"unexpected module {module}")
    elif command[:1] == ["alembic"]:
        from alembic.config import CommandLine, Config
        from alembic.script import ScriptDirectory

        CommandLine().parser.parse_args(command[1:])
        script = ScriptDirectory.from_config(Config(str(ROOT / "alembic.ini")))
        assert Path(script.dir).resolve() == (ROOT / "migrations").resolve()
        assert len(script.get_heads()) == 1, "one migration head, so `upgrade head` is unambiguous"
    elif command[:1] == ["celery"]:
        assert command[1] == "-A", command
        module_name, _, attr = command[2].partition(":")
        import importlib

        from celery import Celery
        from celery.bin.celery import celery as celery_cli

        module = importlib.import_module(module_name)
        assert isinstance(getattr(module, attr or "app"), Celery), f"{command[2]} has no Celery app"
        subcommand = command[3]
        if subcommand == "flower":
            # A plugin command: installed by the `flower` extra (checked against the image below).
            assert any(
                req.startswith("flower") for req in pyproject()["project"]["optional-dependencies"]["flower"]
            )
        else:
            assert subcommand in celery_cli.commands, f"celery has no {subcommand!r} command"
    else:
        raise AssertionError(f"not an entry point of this project: {command}")


# --------------------------------------------------------------------------- compose: shape


def test_compose_parses_with_every_service() -> None:
    """PostgreSQL, RabbitMQ, Redis, migrations, bot, GPU and API workers, and Flower behind a profile."""
    svc = services()
    assert set(svc) == {
        "postgres",
        "rabbitmq",
        "redis",
        "migrate",
        "bot",
        "worker-gpu",
        "worker-api",
        "flower",
    }
    assert svc["flower"].get("profiles") == ["monitoring"]
    assert all("profiles" not in s for name, s in svc.items() if name != "flower")
    for path in (COMPOSE, GPU_WORKER_COMPOSE):
        assert set(load_compose(path)) <= {"name", "services", "volumes", "networks"} | {
            key for key in load_compose(path) if key.startswith("x-")
        }


def test_restart_policies_and_health_checks() -> None:
    """Long-running services restart and report health; the migration runs once."""
    svc = services()
    assert svc["migrate"]["restart"] == "no"
    for name, service in svc.items():
        if name == "migrate":
            continue
        assert service.get("restart") in ("unless-stopped", "always"), name
        check = service.get("healthcheck")
        assert check and check.get("test"), f"{name} has no health check"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name


def test_start_order() -> None:
    """The migration waits for a healthy database; the bot for a finished migration and Redis."""
    svc = services()
    assert svc["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert svc["bot"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    for name in ("bot", "worker-gpu", "worker-api", "flower"):
        assert svc[name]["depends_on"]["redis"]["condition"] == "service_healthy", name
        assert svc[name]["depends_on"]["rabbitmq"]["condition"] == "service_healthy", name
    assert svc["bot"]["environment"]["BROKER_URL"].startswith("amqp://")  # RabbitMQ carries the jobs


def test_every_image_is_built_once_from_an_existing_dockerfile() -> None:
    """Each Mirage image has exactly one service that builds it (parallel builds of a tag clash)."""
    for path in (COMPOSE, GPU_WORKER_COMPOSE):
        builders: dict[str, list[str]] = {}
        for name, service in services(path).items():
            if "build" not in service:
                continue
            image = service["image"]
            builders.setdefault(image, []).append(name)
            context = (path.parent / service["build"]["context"]).resolve()
            assert context == ROOT, f"{path.name}:{name}: build context must be the repository"
            assert (context / service["build"]["dockerfile"]).resolve() == OUR_IMAGES[image].resolve()
        used = {s["image"] for s in services(path).values() if is_ours(s)}
        assert set(builders) == used, f"{path.name}: images used but never built: {used - set(builders)}"
        assert all(len(names) == 1 for names in builders.values()), builders


def test_gpu_worker_reserves_a_gpu_and_keeps_its_caches() -> None:
    """NVIDIA device reservation; the Hugging Face and compile caches are volumes where the image
    points them (so a restart neither re-downloads SDXL nor recompiles)."""
    image_env = dict(
        pair.split("=", 1)
        for ins in dockerfile(WORKER_DOCKERFILE)
        if ins.keyword == "ENV"
        for pair in shlex.split(ins.args)
    )
    declared = set(load_compose(COMPOSE)["volumes"])
    for path in (COMPOSE, GPU_WORKER_COMPOSE):
        service = services(path)["worker-gpu"]
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
        mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in service["volumes"]}
        assert image_env["HF_HOME"] in mounts, "the Hugging Face cache must be a volume"
        compile_dir = environment(service)["COMPILE_CACHE_DIR"]
        assert compile_dir == image_env["COMPILE_CACHE_DIR"] and compile_dir in mounts
        if path == COMPOSE:
            for target in (image_env["HF_HOME"], compile_dir):
                assert mounts[target] in declared
    # One job at a time per GPU process (prefork; prefetch 1 and acks late are in celery_app).
    args = service_command(services()["worker-gpu"])
    assert args[args.index("--concurrency") + 1] == "1"


def test_bot_port_and_health_url_match_the_web_app() -> None:
    """The published port is the one the bot listens on, and /healthz is a real route."""
    from bot.web.app import create_app

    bot = services()["bot"]
    env = environment(bot)
    assert env["WEB_HOST"] == "0.0.0.0"
    targets = {str(port).rsplit(":", 1)[-1] for port in bot["ports"]}
    assert targets == {env["WEB_PORT"]}
    check = " ".join(bot["healthcheck"]["test"])
    url = re.search(r"http://127\.0\.0\.1:(\d+)(/[\w/]*)", check)
    assert url and url.group(1) == env["WEB_PORT"]
    app = create_app(None, None, BotSettings(_env_file=None))  # type: ignore[arg-type]
    paths = {resource.canonical for resource in app.router.resources()}
    assert url.group(2) in paths and "/metrics" in paths


def test_flower_is_not_public() -> None:
    """Flower can revoke tasks and has no login by default: it listens on localhost only."""
    for port in services()["flower"]["ports"]:
        assert str(port).startswith("127.0.0.1:")


# --------------------------------------------------------------------------- commands


def all_commands() -> list[tuple[str, list[str]]]:
    """(where, command) for every Mirage command the deployment runs, health checks included."""
    found: list[tuple[str, list[str]]] = []
    for path in (COMPOSE, GPU_WORKER_COMPOSE):
        for name, service in services(path).items():
            if not is_ours(service):
                continue
            found.append((f"{path.name}:{name}", service_command(service)))
            test = service.get("healthcheck", {}).get("test", [])
            if test and test[0] == "CMD-SHELL":
                found.append((f"{path.name}:{name}:healthcheck", shlex.split(resolve(test[1]))))
    for path in OUR_IMAGES.values():
        found.append((path.name, dockerfile_cmd(path)))
    return found


@pytest.mark.parametrize(("where", "command"), all_commands(), ids=[where for where, _ in all_commands()])
def test_commands_are_real_entry_points(where: str, command: list[str]) -> None:
    """``python -m bot``/``workers`` (with arguments their parsers accept), alembic, celery."""
    check_entry_point(command)


def test_worker_health_checks_ping_the_worker_in_their_own_container() -> None:
    """The node name pinged is the one ``python -m workers worker`` gives itself."""
    from workers.__main__ import build_parser, worker_argv

    for path in (COMPOSE, GPU_WORKER_COMPOSE):
        for name, service in services(path).items():
            command = service_command(service) if is_ours(service) else []
            if command[:4] != ["python", "-m", "workers", "worker"]:
                continue
            parsed = build_parser().parse_args(command[3:])
            hostname = next(a for a in worker_argv(parsed.queues) if a.startswith("--hostname="))
            prefix = hostname.removeprefix("--hostname=").split("@")[0] + "@"
            check = shlex.split(resolve(service["healthcheck"]["test"][1]))
            assert check[check.index("-d") + 1] == f"{prefix}$HOSTNAME", f"{path.name}:{name}"


# --------------------------------------------------------------------------- environment


def compose_envs() -> list[tuple[str, dict[str, Any], dict[str, str | None]]]:
    """(where, service, environment) for every Mirage service in both compose files."""
    return [
        (f"{path.name}:{name}", service, environment(service))
        for path in (COMPOSE, GPU_WORKER_COMPOSE)
        for name, service in services(path).items()
        if is_ours(service)
    ]


def test_compose_sets_only_settings_the_code_reads() -> None:
    """Every variable a Mirage container gets is a field of the settings class it reads."""
    for where, service, env in compose_envs():
        fields = {name.upper() for name in settings_class(service).model_fields}
        unknown = set(env) - fields
        assert not unknown, f"{where} sets {sorted(unknown)}, which its process never reads"


def test_every_setting_reaches_its_process() -> None:
    """The bot gets the whole .env; the workers together get every worker setting."""
    svc = services()
    assert svc["bot"]["env_file"] == ".env"
    worker_keys = set(environment(svc["worker-gpu"])) | set(environment(svc["worker-api"]))
    assert worker_keys == WORKER_FIELDS
    # A remote GPU worker is configured exactly like the local one.
    assert set(environment(services(GPU_WORKER_COMPOSE)["worker-gpu"])) == set(environment(svc["worker-gpu"]))


def test_workers_get_no_discord_or_database_credentials() -> None:
    """Workers never see the Discord token, the database or the media store."""
    for where, service, env in compose_envs():
        if settings_class(service) is not WorkerSettings:
            continue
        assert "env_file" not in service, f"{where}: an env_file would hand it every secret"
        assert not set(env) & NOT_FOR_WORKERS, where
    assert "OPENAI_API_KEY" not in environment(services()["worker-gpu"])
    assert set(environment(services()["migrate"])) == {"DATABASE_URL"}


def test_interpolated_variables_are_settings_or_documented() -> None:
    """``${VAR}`` in a compose file names a setting, or a compose-only variable deploy.md explains."""
    doc = DEPLOY_DOC.read_text()
    for path in (COMPOSE, GPU_WORKER_COMPOSE):
        names = {match.group(1) for match in _VAR_RE.finditer(path.read_text())}
        assert names <= ALL_FIELDS | COMPOSE_ONLY_VARS, f"{path.name}: {sorted(names - ALL_FIELDS)}"
        for name in names & COMPOSE_ONLY_VARS:
            assert name in doc, f"{name} is not documented in docs/deploy.md"


def test_compose_values_are_valid_settings_with_the_codes_defaults() -> None:
    """Each container's environment (nothing set in .env) validates, with the code's defaults."""
    for where, service, env in compose_envs():
        model = settings_class(service)
        values: dict[str, str] = {}
        for key, raw in env.items():
            if raw is None:
                # Passed only when set: only for settings that are unset by default.
                assert plain(field_default(model, key)) in (None, ""), f"{where}: {key}"
                continue
            value = resolve(raw)
            values[key.lower()] = value
            interpolated = _VAR_RE.fullmatch(raw)
            if not interpolated or interpolated.group(2) != ":-":
                continue
            default = plain(field_default(model, key))
            if key in CONTAINER_PATH_DEFAULTS:
                assert value == CONTAINER_PATH_DEFAULTS[key], f"{where}: {key}"
            elif default is None:
                # "" stands for unset only where the code tests the value's truth (str, not Path).
                assert value == "" and "str" in annotation_text(model, key), f"{where}: {key}"
                assert "Path" not in annotation_text(model, key), f"{where}: {key}: '' is the current folder"
            else:
                parsed = plain(getattr(model.model_validate({key.lower(): value}), key.lower()))
                assert parsed == default, f"{where}: {key} defaults to {value!r}, the code to {default!r}"
        try:
            settings = model.model_validate(values)
        except ValidationError as exc:
            raise AssertionError(f"{where}: {exc}") from exc
        if isinstance(settings, WorkerSettings):
            from workers.celery_app import make_celery

            make_celery(settings)  # raises if the time limits contradict each other


def test_container_paths_are_mounted() -> None:
    """Paths the compose files hand a worker lie on a volume of that worker."""
    for path in (COMPOSE, GPU_WORKER_COMPOSE):
        service = services(path)["worker-gpu"]
        targets = [volume.split(":")[1] for volume in service["volumes"]]
        for key, value in CONTAINER_PATH_DEFAULTS.items():
            assert any(value == t or value.startswith(t.rstrip("/") + "/") for t in targets), key


# --------------------------------------------------------------------------- .env.example

_ENV_LINE = re.compile(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$")


def env_example() -> tuple[dict[str, str], dict[str, str]]:
    """(set, commented out) assignments of .env.example."""
    active: dict[str, str] = {}
    commented: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = _ENV_LINE.match(line.strip())
        if not match:
            continue
        target = commented if match.group(1) else active
        key = match.group(2)
        assert key not in active and key not in commented, f"{key} listed twice"
        target[key] = match.group(3)
    return active, commented


def test_env_example_lists_exactly_the_settings() -> None:
    """Every field of BotSettings and WorkerSettings, nothing else, each once."""
    active, commented = env_example()
    assert set(active) | set(commented) == ALL_FIELDS


def test_env_example_values_are_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading .env.example changes nothing: its values are the code's defaults, secrets empty."""
    for name in ALL_FIELDS:
        monkeypatch.delenv(name, raising=False)
    active, commented = env_example()
    for model in (BotSettings, WorkerSettings):
        loaded = model(_env_file=ENV_EXAMPLE)
        for name in model.model_fields:
            value, default = plain(getattr(loaded, name)), plain(field_default(model, name))
            if default is None and value == "":
                assert "Path" not in annotation_text(model, name), f"{name}: '' would be a path"
                continue
            assert value == default, f"{name.upper()}: .env.example gives {value!r}, the code {default!r}"
    for model in (BotSettings, WorkerSettings):
        for name, info in model.model_fields.items():
            if info.annotation is SecretStr or "SecretStr" in str(info.annotation):
                assert active.get(name.upper()) == "", f"{name.upper()} must be listed, empty"
    # Each commented-out example is a valid value for its setting.
    for key, value in commented.items():
        model = BotSettings if key in BOT_FIELDS else WorkerSettings
        model.model_validate({key.lower(): value})


def test_env_example_has_no_inline_comments() -> None:
    """Compose and python-dotenv disagree on ``KEY=value # comment``: comments go on their own line."""
    active, commented = env_example()
    for key, value in {**active, **commented}.items():
        assert "#" not in value and value == value.strip(), key


def test_bot_paths_in_env_example_are_mounted() -> None:
    """A file or folder .env.example suggests to the bot lies on a volume of the bot's container.

    The bot reads the whole .env, so an example path an operator uncomments (banned words, styles)
    must exist in the container, or the bot fails at start; relative paths are from its WORKDIR.
    """
    active, commented = env_example()
    bot = services()["bot"]
    env = environment(bot)
    workdir = next(ins.args for ins in dockerfile(BOT_DOCKERFILE) if ins.keyword == "WORKDIR")
    targets = [str(volume).split(":")[1].rstrip("/") for volume in bot.get("volumes", [])]
    for key, value in {**active, **commented}.items():
        if key not in BOT_FIELDS or "Path" not in annotation_text(BotSettings, key) or not value:
            continue
        value = env.get(key) or value  # the compose file's own value wins over .env
        path = value if value.startswith("/") else f"{workdir.rstrip('/')}/{value}"
        assert any(path == t or path.startswith(t + "/") for t in targets), f"{key}={value}: not on a volume"


# --------------------------------------------------------------------------- images


def test_bot_image_never_installs_torch() -> None:
    """The bot image (also the API worker's and Flower's) installs no gpu extra, nothing CUDA."""
    instructions = dockerfile(BOT_DOCKERFILE)
    extras = pip_extras(BOT_DOCKERFILE)
    assert "gpu" not in extras
    base = next(ins.args for ins in instructions if ins.keyword == "FROM").lower()
    assert "cuda" not in base and "pytorch" not in base
    for ins in instructions:
        if ins.keyword == "RUN":
            assert not re.search(r"\b(torch|diffusers|transformers)\b", ins.args), ins.args
    gpu = pyproject()["project"]["optional-dependencies"]["gpu"]
    for extra in extras:
        for requirement in pyproject()["project"]["optional-dependencies"][extra]:
            assert requirement not in gpu and not requirement.startswith("torch"), (extra, requirement)
    assert not any(req.startswith("torch") for req in pyproject()["project"]["dependencies"])


def test_worker_image_installs_cuda_torch() -> None:
    """The GPU worker image: a CUDA PyTorch base, the gpu extra, torch pinned to the base's build."""
    instructions = dockerfile(WORKER_DOCKERFILE)
    base = next(ins.args for ins in instructions if ins.keyword == "FROM").lower()
    assert "cuda" in base and "pytorch" in base
    assert "gpu" in pip_extras(WORKER_DOCKERFILE)
    installs = [ins.args for ins in instructions if ins.keyword == "RUN" and "[gpu" in ins.args]
    assert any(" -c " in args for args in installs), "pin the base image's torch with a constraint"


def test_images_install_real_extras_and_flower_where_it_runs() -> None:
    """Extras named in the Dockerfiles exist; the image running Flower has the flower extra."""
    known = set(pyproject()["project"]["optional-dependencies"])
    for path in OUR_IMAGES.values():
        assert pip_extras(path) <= known, path.name
    flower_image = services()["flower"]["image"]
    assert "flower" in pip_extras(OUR_IMAGES[flower_image])
    api_image = services()["worker-api"]["image"]
    assert "openai" in pip_extras(OUR_IMAGES[api_image])


def test_api_worker_runs_without_torch() -> None:
    """The API worker runs from the bot image: its task module must import with torch absent."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'diffusers', 'transformers'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import workers.celery_app, workers.tasks, workers.openai_engine, workers.__main__\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_dockerfile_copies_exist_and_are_not_ignored() -> None:
    """Every COPY source exists and .dockerignore keeps it (and keeps secrets and venvs out)."""
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".env", ".venv", ".git", "data"} <= ignored
    for path in OUR_IMAGES.values():
        for ins in dockerfile(path):
            if ins.keyword != "COPY":
                continue
            *sources, _dest = shlex.split(ins.args)
            for source in sources:
                assert (ROOT / source).exists(), f"{path.name}: COPY {source}: missing"
                assert source.rstrip("/") not in ignored, f"{path.name}: {source} is in .dockerignore"


def test_deploy_doc_covers_the_operations() -> None:
    """docs/deploy.md explains deploy, remote GPU workers, upgrade, backups and scaling."""
    doc = DEPLOY_DOC.read_text().lower()
    for needle in (
        "docker compose up -d",
        "docker compose run --rm migrate",
        "gpu-worker.compose.yml",
        "broker_url",
        "result_backend",
        "sdxl_model",
        "pg_dump",
        ".backup",
        "prefetch",
        "acks late",
        "/metrics",
    ):
        assert needle in doc, needle
