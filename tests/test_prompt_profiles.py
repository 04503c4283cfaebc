"""Model profiles, speed classes and where they take a job: queues, priorities, release order, cost."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from bot.dispatch import CeleryDispatcher, make_celery_client, task_priority
from bot.models import Job
from bot.profiles import ModelProfile, ProfileConfigError, Prompting, load_profiles, profile_key
from bot.settings import BotSettings
from bot.speed import job_cost, release_order, speed_cost
from bot.styles import shipped_presets
from workers.schema import Engine, GenerationParams, JobKind, JobRequest

PROFILES = json.dumps(
    {
        "7": {"queue": "gpu-v7", "loras": {"detail": 0.6}, "style": "cinematic"},
        "niji6": {"queue": "gpu-anime", "loras": {"anime-lines": 1}},
        "6.1": {},
    }
)


def test_profiles_load_from_json_with_normalised_names() -> None:
    profiles = load_profiles(PROFILES)
    assert set(profiles) == {"7", "niji 6", "6.1"}
    assert profiles["7"] == ModelProfile("7", "gpu-v7", {"detail": 0.6}, "cinematic")
    assert profile_key("Niji-6") == "niji 6" and profile_key("7.0") == "7"


def test_profiles_load_from_a_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "profiles.toml"
    path.write_text('["niji 6"]\nqueue = "gpu-anime"\nloras = { lines = 0.5 }\n', encoding="utf-8")
    assert load_profiles(str(path))["niji 6"] == ModelProfile("niji 6", "gpu-anime", {"lines": 0.5})


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ('{"7": {"queue": "gpu v7"}}', "queue must be a queue name"),
        ('{"7": {"loras": {"x": 9}}}', "weight from -4 to 4"),
        ('{"7": {"checkpoint": "x"}}', "unknown keys checkpoint"),
        ("{not json", "not valid JSON"),
        ("/nowhere/profiles.toml", "cannot read"),
    ],
)
def test_bad_profiles_name_the_problem(value: str, problem: str) -> None:
    with pytest.raises(ProfileConfigError, match=problem):
        load_profiles(value)


def test_a_profile_style_that_is_not_a_preset_is_refused_at_start() -> None:
    settings = BotSettings(_env_file=None, model_profiles='{"7": {"style": "nope"}}')  # type: ignore[call-arg]
    with pytest.raises(ProfileConfigError, match="'nope' is not a preset"):
        Prompting.from_settings(settings)


def test_prepare_applies_the_profile_style_then_its_lora_tags() -> None:
    prompting = Prompting(shipped_presets(), None, load_profiles(PROFILES))
    prepared = prompting.prepare(GenerationParams(prompt="a fox", model_profile="7"))
    assert prepared.prompt == "a fox <lora:detail:0.6>"
    assert prepared.style == "cinematic"
    assert all("<lora" not in part.text for part in prepared.parts)
    assert "a fox" in prepared.parts[0].text and prepared.parts[0].text != "a fox"


def test_the_prompt_style_wins_over_the_profile_and_raw_skips_styles_but_keeps_loras() -> None:
    prompting = Prompting(shipped_presets(), "cinematic", load_profiles(PROFILES))
    other = sorted(name for name in shipped_presets() if name != "cinematic")[0]
    assert prompting.prepare(GenerationParams(prompt="a fox", style=other)).style == other
    raw = prompting.prepare(GenerationParams(prompt="a fox", raw=True, model_profile="niji 6"))
    assert raw.parts == () and raw.prompt == "a fox <lora:anime-lines:1>"


def test_the_house_style_applies_once_and_unmapped_profiles_get_a_note() -> None:
    prompting = Prompting(shipped_presets(), "cinematic", load_profiles(PROFILES))
    params = GenerationParams(prompt="a fox", model_profile="5.2")
    once = prompting.prepare(params)
    assert once.style == "cinematic" and once.prompt == "a fox"
    assert prompting.notes(params) == ["`--v 5.2` is not set up on this server; the default model is used."]
    assert prompting.notes(GenerationParams(prompt="a", model_profile="6.1")) == []


@pytest.mark.parametrize(
    ("broker", "expected"),
    [
        ("amqp://guest@rabbit//", {"turbo": 9, "fast": 5, "relax": 1, None: 5}),
        ("redis://127.0.0.1:6379/0", {"turbo": 0, "fast": 3, "relax": 6, None: 3}),
        ("sqla+sqlite:///broker.db", {"turbo": None, "fast": None, "relax": None, None: None}),
    ],
)
def test_task_priority_per_broker(broker: str, expected: dict[str | None, int | None]) -> None:
    assert {speed: task_priority(speed, broker) for speed in expected} == expected


class _RecordingApp:
    """Stands in for the Celery client app: records what send_task was given."""

    def __init__(self, broker_url: str) -> None:
        self.conf = type("Conf", (), {"broker_url": broker_url})()
        self.sent: list[dict[str, Any]] = []

    def send_task(self, name: str, **kwargs: Any) -> None:
        self.sent.append({"name": name, **kwargs})

    def close(self) -> None:
        """Nothing to close."""


@pytest.mark.parametrize(("speed", "priority"), [("turbo", 9), ("relax", 1), (None, 5)])
def test_the_dispatcher_sends_the_profile_queue_and_the_speed_priority(
    speed: str | None, priority: int
) -> None:
    app = _RecordingApp("amqp://guest@rabbit//")
    dispatcher = CeleryDispatcher(app, profile_queues={"7": "gpu-v7"})  # type: ignore[arg-type]
    params = GenerationParams(prompt="a fox", model_profile="7", speed=speed)
    request = JobRequest(job_id="j1", kind=JobKind.IMAGINE, params=params, seed=1)
    asyncio.run(dispatcher.send(request, Engine.SDXL))
    asyncio.run(dispatcher.send(request.model_copy(update={"job_id": "j2"}), Engine.OPENAI))
    asyncio.run(dispatcher.close())
    assert [(s["queue"], s["priority"]) for s in app.sent] == [("gpu-v7", priority), ("api", priority)]


def test_rabbitmq_queues_are_declared_with_a_max_priority() -> None:
    assert make_celery_client("amqp://guest@rabbit//", "redis://x/1").conf.task_queue_max_priority == 10
    assert make_celery_client("redis://x/0", "redis://x/1").conf.task_queue_max_priority is None


def _job(job_id: str, speed: str | None, minutes: int) -> Job:
    params: dict[str, Any] = {"prompt": job_id} | ({"speed": speed} if speed else {})
    return Job(
        id=job_id, params=params, created_at=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=minutes)
    )


def test_release_order_is_turbo_then_fast_then_relax_oldest_first() -> None:
    jobs = [_job("r1", "relax", 0), _job("f1", None, 1), _job("t1", "turbo", 2), _job("f2", "fast", 3)]
    jobs.append(_job("t2", "turbo", 4))
    assert [job.id for job in release_order(jobs)] == ["t1", "t2", "f1", "f2", "r1"]


def test_relax_costs_the_factor_rounded_down() -> None:
    assert [speed_cost(2, speed, 0.5) for speed in ("turbo", "fast", None, "relax")] == [2, 2, 2, 1]
    assert speed_cost(3, "relax", 0) == 0
    settings = BotSettings(_env_file=None, relax_cost_factor=0.5, cost_openai_grid=4)  # type: ignore[call-arg]
    assert job_cost(settings, JobKind.IMAGINE, Engine.OPENAI, "relax") == 2
    assert job_cost(settings, JobKind.CROP, Engine.SDXL, "relax") == settings.cost_crop
