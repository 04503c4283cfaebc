"""Credits priced by work: steps, megapixels and images against today's base job."""

from __future__ import annotations

from bot.pricing import PriceBase, Work, job_price, needs_confirmation, price, work_of
from bot.settings import BotSettings
from workers.schema import Engine, GenerationParams, JobKind

BASE = PriceBase()  # 25 steps, 1 MP, 4 images


def settings(**overrides: object) -> BotSettings:
    return BotSettings(_env_file=None, **overrides)  # type: ignore[call-arg]


def test_the_base_job_costs_what_it_costs_today() -> None:
    assert price(1, Work(steps=25, megapixels=1.0, images=4)) == 1
    assert price(2, Work(steps=25, megapixels=1.0, images=4)) == 2


def test_cost_scales_with_steps_megapixels_and_images() -> None:
    assert price(1, Work(steps=50, megapixels=1.0, images=4)) == 2
    assert price(1, Work(steps=25, megapixels=2.0, images=4)) == 2
    assert price(1, Work(steps=100, megapixels=1.0, images=4)) == 4
    assert price(2, Work(steps=25, megapixels=1.0, images=2)) == 1


def test_a_small_job_still_costs_one_credit_and_a_free_kind_stays_free() -> None:
    assert price(1, Work(steps=6, megapixels=0.25, images=4)) == 1
    assert price(0, Work(steps=150, megapixels=4.0, images=4)) == 0


def test_openai_images_ignore_steps() -> None:
    assert price(2, Work(steps=150, megapixels=1.0, images=4), per_step=False) == 2


def test_a_150_step_upscale_costs_six_times_a_25_step_one() -> None:
    config = settings()
    quick = job_price(config, JobKind.UPSCALE, Engine.SDXL, GenerationParams(prompt="x"), scale=2.0)
    slow = job_price(config, JobKind.UPSCALE, Engine.SDXL, GenerationParams(prompt="x", steps=150), scale=2.0)
    grid = job_price(config, JobKind.IMAGINE, Engine.SDXL, GenerationParams(prompt="x"))
    assert (quick, grid) == (1, 1)  # today's prices for today's jobs
    assert slow == 6


def test_quality_two_doubles_a_grid_and_crops_stay_flat() -> None:
    config = settings()
    assert job_price(config, JobKind.IMAGINE, Engine.SDXL, GenerationParams(prompt="x", quality=2)) == 2
    assert job_price(config, JobKind.CROP, Engine.SDXL, GenerationParams(prompt="x", steps=150)) == 0


def test_the_formula_is_configurable() -> None:
    config = settings(price_base_steps=50)
    assert job_price(config, JobKind.IMAGINE, Engine.SDXL, GenerationParams(prompt="x", steps=50)) == 1


def test_work_of_an_upscale_is_one_image_at_the_scaled_size() -> None:
    work = work_of(JobKind.UPSCALE, Engine.SDXL, GenerationParams(prompt="x"), scale=2.0)
    assert (work.images, work.megapixels, work.steps) == (1, 4.0, 25)
    grid = work_of(JobKind.IMAGINE, Engine.SDXL, GenerationParams(prompt="x"))
    assert (grid.images, grid.megapixels) == (4, 1.0)


def test_expensive_jobs_ask_first() -> None:
    assert not needs_confirmation(3, 4)
    assert needs_confirmation(4, 4)


def test_relax_pays_the_factor_of_the_priced_job_not_of_the_base() -> None:
    """--relax halves what the work costs; it must not round the base to 0 before the work counts."""
    config = settings(relax_cost_factor=0.5)
    relaxed = GenerationParams(prompt="x", speed="relax")
    assert job_price(config, JobKind.IMAGINE, Engine.SDXL, relaxed) == 0  # today's relaxed grid
    quality = GenerationParams(prompt="x", quality=2, speed="relax")
    assert job_price(config, JobKind.IMAGINE, Engine.SDXL, quality) == 1  # 2 credits of work, half
    slow = GenerationParams(prompt="x", steps=150, speed="relax")
    assert job_price(config, JobKind.UPSCALE, Engine.SDXL, slow, scale=2.0) == 3  # 6 credits, half
    assert job_price(config, JobKind.IMAGINE, Engine.OPENAI, relaxed) == 1
