"""Custom Zoom: the form's text and how a submitted form is read (``--zoom`` 1 to 2, ``--ar`` for
a new shape, clear messages otherwise), and the whole path on the fake Discord: the button opens
the form, a valid submit makes a ZOOM job with that scale and aspect, a bad one makes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bot.custom_zoom import NO_ZOOM, NOTHING_TO_DO, CustomZoomError, form_text, read_form
from bot.models import Job, JobStatus
from tests.botutil import (
    EPHEMERAL,
    FakeDispatcher,
    Harness,
    bot_harness,
    finish_grid,
    has_result,
    press_and_wait,
    styles,
)
from workers.schema import GenerationParams, JobKind

pytestmark = pytest.mark.timeout(60)
SQUARE = GenerationParams(prompt="a fox")


def test_the_form_starts_with_the_prompt_its_aspect_and_zoom_2() -> None:
    assert form_text(SQUARE) == "a fox --ar 1:1 --zoom 2"
    wide = GenerationParams(prompt="a fox", aspect=(16, 9), width=1344, height=768)
    assert form_text(wide) == "a fox --ar 16:9 --zoom 2"


@pytest.mark.parametrize(
    ("text", "zoom", "aspect", "prompt"),
    [
        ("a fox --ar 1:1 --zoom 2", 2.0, (1, 1), "a fox"),
        ("a red fox --zoom 1.5 --ar 1:1", 1.5, (1, 1), "a red fox"),
        ("a fox --ar 16:9 --zoom 1", 1.0, (16, 9), "a fox"),  # only the shape changes
        ("a fox --ar 2:3 --ZOOM 1.25", 1.25, (2, 3), "a fox"),
        ("a fox --ar 1:1 \u2014zoom 1.5", 1.5, (1, 1), "a fox"),  # a phone's "--" is a dash
    ],
)
def test_a_valid_form_gives_the_zoom_and_parameters(
    text: str, zoom: float, aspect: tuple[int, int], prompt: str
) -> None:
    got_zoom, params = read_form(text, SQUARE)
    assert got_zoom == zoom and params.aspect == aspect and params.prompt == prompt


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a fox --ar 1:1", NO_ZOOM),
        ("a fox --zoom", "`--zoom` must be a number from 1 to 2."),
        ("a fox --zoom 3", "`--zoom` must be a number from 1 to 2 (you wrote `3`)."),
        ("a fox --zoom 0.5", "`--zoom` must be a number from 1 to 2 (you wrote `0.5`)."),
        ("a fox --zoom big", "`--zoom` must be a number from 1 to 2 (you wrote `big`)."),
        ("a fox --zoom nan", "`--zoom` must be a number from 1 to 2 (you wrote `nan`)."),
        ("a fox --zoom 1.5 --zoom 2", "Use `--zoom` once."),
        ("a fox --ar 1:1 --zoom 1", NOTHING_TO_DO),
    ],
)
def test_a_bad_form_says_what_to_fix(text: str, message: str) -> None:
    with pytest.raises(CustomZoomError) as caught:
        read_form(text, SQUARE)
    assert str(caught.value) == message


def test_the_prompt_parser_explains_other_mistakes() -> None:
    with pytest.raises(CustomZoomError, match="--ar 0:1"):
        read_form("a fox --ar 0:1 --zoom 2", SQUARE)


# --- on the fake Discord ------------------------------------------------------------------------


async def single_image(h: Harness) -> tuple[Job, dict[str, Any]]:
    """A grid, then U2: the single image and its message."""
    grid, message = await finish_grid(h, "a lighthouse --seed 77")
    press, _ = await press_and_wait(h, f"mj:u:{grid.id}:2", message)
    result = await press.wait_original(has_result)
    return await h.job_for(press), result


async def open_form(h: Harness) -> tuple[Job, dict[str, Any], str]:
    """An upscaled image, its message, and the custom_id of the Custom Zoom form it opened."""
    image, message = await single_image(h)
    press, _ = await press_and_wait(h, f"mj:cz:{image.id}", message)
    assert press.modal is not None
    return image, message, str(press.modal["custom_id"])


async def test_custom_zoom_opens_the_form_and_makes_a_zoom_job(h: Harness) -> None:
    image, message = await single_image(h)
    press, callback = await press_and_wait(h, f"mj:cz:{image.id}", message)
    assert callback.callback_type == 9
    form = press.modal
    assert form is not None and form["custom_id"] == f"mj:czm:{image.id}:{h.fake.user.id}"
    [field] = [c for row in form["components"] for c in row["components"]]
    assert field["value"] == "a lighthouse --seed 77 --ar 1:1 --zoom 2"

    submit = await h.fake.submit_modal(
        form["custom_id"], {field["custom_id"]: "a lighthouse at night --ar 16:9 --zoom 1.5"}, message=message
    )
    assert (await submit.callback()).callback_type == 5
    job = await h.job_for(submit)
    assert job.kind == JobKind.ZOOM and job.parent_id == image.id and job.cost == 1
    await h.wait_job(job.id, lambda j: j.status == JobStatus.QUEUED)
    request = h.dispatcher.request(job.id)
    assert request.scale == 1.5 and request.input_image is not None and request.seed == 77
    assert request.params.aspect == (16, 9) and request.params.prompt == "a lighthouse at night"
    assert (request.params.width, request.params.height) == (1344, 768)

    # The pressed button turned blue; the others kept their look.
    marked = h.fake.get_message(message["id"])
    assert marked is not None and styles(marked)[f"mj:cz:{image.id}"] == 1
    assert styles(marked)[f"mj:zoom:{image.id}:2"] == 2
    h.dispatcher.succeed(job.id)
    result = await submit.wait_original(has_result)
    assert "Zoom Out 1.5x" in result["content"]


async def test_a_bad_form_is_refused_privately_and_nothing_is_made(h: Harness) -> None:
    image, message, form = await open_form(h)
    count = await h.job_count()
    submit = await h.fake.submit_modal(form, {"prompt": "a lighthouse --zoom 3"}, message=message)
    callback = await submit.callback()
    assert callback.callback_type == 4 and callback.message_payload["flags"] & EPHEMERAL
    assert "from 1 to 2" in callback.message_payload["content"]
    await h.settle()
    assert await h.job_count() == count
    stored = h.fake.get_message(message["id"])
    assert stored is not None and styles(stored)[f"mj:cz:{image.id}"] == 2


async def test_a_form_left_open_across_a_bot_restart_still_makes_its_job(h: Harness) -> None:
    # discord.py only keeps the form object in memory: the submit is read from its custom_id and
    # field, so a form opened before a restart (a deploy) is not answered with silence.
    image, message, form = await open_form(h)
    await h.restart_bot()
    submit = await h.fake.submit_modal(form, {"prompt": "a lighthouse --ar 1:1 --zoom 1.5"}, message=message)
    assert (await submit.callback()).callback_type == 5
    job = await h.job_for(submit)
    assert job.kind == JobKind.ZOOM and job.parent_id == image.id and job.params["scale"] == 1.5
    await h.fake.wait_for_message(
        lambda m: m["id"] == message["id"] and styles(m).get(f"mj:cz:{image.id}") == 1
    )


async def test_one_submit_makes_one_job(h: Harness) -> None:
    _image, message, form = await open_form(h)
    count = await h.job_count()
    submit = await h.fake.submit_modal(form, {"prompt": "a lighthouse --ar 1:1 --zoom 2"}, message=message)
    await h.job_for(submit)
    await h.settle()
    assert await h.job_count() == count + 1


async def test_a_costly_form_asks_and_yes_turns_custom_zoom_blue(h: Harness) -> None:
    # 100 steps makes the zoom cost 4 credits, so it asks first; Yes marks the button that
    # opened the form (not the form's own id, which no button has).
    image, message, form = await open_form(h)
    submit = await h.fake.submit_modal(
        form, {"prompt": "a lighthouse --steps 100 --ar 1:1 --zoom 2"}, message=message
    )
    question = await submit.wait_original()
    assert "costs 4 credits" in question["content"]
    [yes] = [
        c["custom_id"]
        for row in question["components"]
        for c in row["components"]
        if c["custom_id"].endswith(":yes")
    ]
    answer, _ = await press_and_wait(h, yes, question)
    job = await h.job_for(answer)
    assert job.kind == JobKind.ZOOM and job.cost == 4 and job.params["steps"] == 100
    await h.fake.wait_for_message(
        lambda m: m["id"] == message["id"] and styles(m).get(f"mj:cz:{image.id}") == 1
    )


async def test_an_image_in_an_owners_style_can_be_zoomed(tmp_path: Path, sqlite_url: str) -> None:
    # The form is prefilled with the image's `--style`: a preset the owner added must read as
    # it does in /imagine, or the unchanged form is refused.
    styles_dir = tmp_path / "styles"
    styles_dir.mkdir()
    (styles_dir / "house.toml").write_text('description = "The house look."\nprompt = "{prompt}, in oils"\n')
    async with bot_harness(tmp_path, sqlite_url, FakeDispatcher(), styles_dir=styles_dir) as sh:
        grid, message = await finish_grid(sh, "a lighthouse --style house")
        press, _ = await press_and_wait(sh, f"mj:u:{grid.id}:1", message)
        result = await press.wait_original(has_result)
        image = await sh.job_for(press)
        press, _ = await press_and_wait(sh, f"mj:cz:{image.id}", result)
        assert press.modal is not None
        [field] = [c for row in press.modal["components"] for c in row["components"]]
        assert "--style house" in field["value"]
        submit = await sh.fake.submit_modal(
            press.modal["custom_id"], {"prompt": field["value"]}, message=result
        )
        job = await sh.job_for(submit)
        assert job.kind == JobKind.ZOOM and job.params["style"] == "house"
