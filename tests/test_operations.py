"""What a job is: operations stored on a row, the member's defaults, and parameters read back."""

from __future__ import annotations

from pathlib import Path

from bot.models import Job, Member
from bot.operations import (
    Operation,
    apply_member_aspect,
    generation_params,
    grid_count,
    job_notes,
    resolve_engine,
    resolve_visibility,
)
from bot.settings import BotSettings
from workers.schema import Direction, Engine, GenerationParams, JobKind, Visibility


def settings(tmp_path: Path, **values: object) -> BotSettings:
    return BotSettings(_env_file=None, media_dir=tmp_path, **values)  # type: ignore[call-arg]


def test_an_operation_survives_the_round_trip_through_a_row() -> None:
    operation = Operation(JobKind.PAN, direction=Direction.UP)
    job = Job(kind=JobKind.PAN.value, params={"prompt": "p", **operation.as_dict()})
    assert Operation.from_job(job) == operation
    assert Operation(JobKind.REROLL).as_dict() == {}


def test_generation_params_leave_out_the_operation_and_notes() -> None:
    job = Job(params={"prompt": "a fox", "seed": 3, "strength": 0.5, "notes": ["n"]})
    assert generation_params(job) == GenerationParams(prompt="a fox", seed=3)
    assert job_notes(job) == ["n"]
    assert job_notes(Job(params={"notes": "not a list"})) == []


def test_only_upscales_and_crops_are_single_images() -> None:
    assert {kind for kind in JobKind if grid_count(kind) == 1} == {JobKind.UPSCALE, JobKind.CROP}


def test_engine_prompt_then_member_then_server(tmp_path: Path) -> None:
    config = settings(tmp_path, default_engine="sdxl")
    member = Member(default_engine="openai")
    assert resolve_engine(GenerationParams(prompt="p", engine=Engine.SDXL), member, config) == Engine.SDXL
    assert resolve_engine(GenerationParams(prompt="p"), member, config) == Engine.OPENAI
    assert (
        resolve_engine(GenerationParams(prompt="p"), Member(default_engine="dalle"), config) == Engine.OPENAI
    )
    assert resolve_engine(GenerationParams(prompt="p"), Member(default_engine="??"), config) == Engine.SDXL


def test_visibility_prompt_then_member_then_server(tmp_path: Path) -> None:
    config = settings(tmp_path, default_visibility="public")
    stealthy = Member(visibility="stealth")
    assert resolve_visibility(None, stealthy, config) == Visibility.STEALTH
    public = GenerationParams(prompt="p", visibility=Visibility.PUBLIC)
    assert resolve_visibility(public, stealthy, config) == Visibility.PUBLIC
    assert resolve_visibility(None, None, config) == Visibility.PUBLIC


def test_member_aspect_applies_only_without_ar() -> None:
    member = Member(default_aspect="16:9")
    widened = apply_member_aspect(GenerationParams(prompt="p"), member)
    assert widened.aspect == (16, 9) and widened.width > widened.height
    asked = GenerationParams(prompt="p", aspect=(1, 1))
    assert apply_member_aspect(asked, member) is asked
    assert apply_member_aspect(GenerationParams(prompt="p"), Member(default_aspect="bad")).aspect == (1, 1)
