"""Remix mode through the fake Discord: buttons open the prompt editor; a bad edit is free."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bot import buttons
from bot.models import JobStatus
from tests.botutil import (
    EPHEMERAL,
    FakeDispatcher,
    Harness,
    bot_harness,
    credits_used,
    finish_grid,
    has_result,
    press_and_wait,
    private_followup,
    styles,
)
from workers.schema import JobKind

pytestmark = pytest.mark.timeout(90)
MODAL = 9  # the interaction callback type that opens a modal


async def remix_on(h: Harness) -> None:
    """``/prefer remix`` once: Remix mode on."""
    inter = await h.fake.slash("prefer", {}, subcommand="remix")
    callback = await inter.callback()
    assert "Remix mode is **on**" in callback.message_payload["content"]


def field_value(modal: dict[str, Any]) -> str:
    """The prefilled text of the modal's one field."""
    [row] = modal["components"]
    [field] = row["components"]
    assert field["custom_id"] == "prompt"
    return str(field["value"])


async def test_remix_on_v1_opens_the_editor_and_submitting_uses_the_edited_prompt(h: Harness) -> None:
    grid, message = await finish_grid(h, "a red fox --ar 3:2 --stylize 250")
    await remix_on(h)
    sent = len(h.dispatcher.sent)
    _press, callback = await press_and_wait(h, f"mj:v:{grid.id}:1", message)
    assert callback.callback_type == MODAL
    modal = callback.json["data"]
    assert field_value(modal) == "a red fox --ar 3:2 --stylize 250"
    assert await h.job_count() == 1  # nothing started yet
    submit = await h.fake.submit_modal(
        modal["custom_id"], {"prompt": "a blue fox --ar 3:2 --chaos 20"}, message=message
    )
    job = await h.job_for(submit)
    assert job.kind == JobKind.VARIATION and job.parent_id == grid.id and job.parent_index == 1
    assert job.prompt == "a blue fox" and job.params["chaos"] == 20 and job.params["strength"] == 0.85
    [request] = (await h.dispatcher.wait_sent(sent + 1))[sent:]
    assert request.params.prompt == "a blue fox" and request.input_image  # still the parent's image
    assert await credits_used(h, h.fake.user.id) == 2


async def test_remix_on_vary_opens_the_editor_too(h: Harness) -> None:
    grid, message = await finish_grid(h, "a lighthouse")
    press, _callback = await press_and_wait(h, f"mj:u:{grid.id}:2", message)
    crop = await press.wait_original(has_result)
    await remix_on(h)
    _press, callback = await press_and_wait(h, f"mj:vary:{(await h.job_for(press)).id}:subtle", crop)
    assert callback.callback_type == MODAL
    assert field_value(callback.json["data"]) == "a lighthouse"
    submit = await h.fake.submit_modal(
        callback.json["data"]["custom_id"], {"prompt": "a lighthouse at night"}
    )
    job = await h.job_for(submit)
    assert job.kind == JobKind.VARIATION and job.prompt == "a lighthouse at night"
    assert job.params["strength"] == 0.5


async def test_a_bad_edit_is_refused_privately_and_nothing_is_charged(h: Harness) -> None:
    grid, message = await finish_grid(h, "a red fox")
    await remix_on(h)
    _press, callback = await press_and_wait(h, f"mj:r:{grid.id}", message)
    assert callback.callback_type == MODAL
    submit = await h.fake.submit_modal(
        callback.json["data"]["custom_id"], {"prompt": "a red fox --chaos 500"}
    )
    answer = await submit.callback()
    assert answer.callback_type == 4 and answer.message_payload["flags"] & EPHEMERAL
    assert (
        "chaos" in answer.message_payload["content"]
        and "Nothing was charged" in answer.message_payload["content"]
    )
    assert await h.job_count() == 1 and await credits_used(h, h.fake.user.id) == 1


async def test_without_remix_the_button_starts_at_once(h: Harness) -> None:
    grid, message = await finish_grid(h, "a red fox")
    press, callback = await press_and_wait(h, f"mj:v:{grid.id}:2", message)
    assert callback.callback_type == 5
    job = await h.job_for(press)
    assert job.kind == JobKind.VARIATION and job.prompt == "a red fox"
    await h.wait_job(job.id, lambda j: j.status == JobStatus.QUEUED)


async def test_an_editor_left_open_across_a_bot_restart_still_starts_its_job(h: Harness) -> None:
    grid, message = await finish_grid(h, "a red fox")
    await remix_on(h)
    _press, callback = await press_and_wait(h, f"mj:v:{grid.id}:3", message)
    assert callback.callback_type == MODAL
    await h.restart_bot()  # the new process never saw the modal
    submit = await h.fake.submit_modal(
        callback.json["data"]["custom_id"], {"prompt": "a grey fox"}, message=message
    )
    job = await h.job_for(submit)
    assert job.kind == JobKind.VARIATION and job.prompt == "a grey fox" and job.parent_index == 3
    assert await credits_used(h, h.fake.user.id) == 2
    # Accepted: the V3 button turns blue, as after a press without the editor.
    await h.fake.wait_for_message(
        lambda m: m["id"] == message["id"] and styles(m).get(f"mj:v:{grid.id}:3") == 1
    )


async def test_remix_set_in_a_guild_applies_to_buttons_in_a_dm(tmp_path: Path, sqlite_url: str) -> None:
    async with bot_harness(tmp_path, sqlite_url, FakeDispatcher(), allow_dms=True) as dm_h:
        await finish_grid(dm_h, "a harbour")  # the guild account DM jobs are charged to
        await remix_on(dm_h)
        grid, message = await finish_grid(dm_h, "a lighthouse", dm=True)
        _press, callback = await press_and_wait(dm_h, f"mj:v:{grid.id}:1", message)
        assert callback.callback_type == MODAL
        submit = await dm_h.fake.submit_modal(
            callback.json["data"]["custom_id"], {"prompt": "a lighthouse in fog"}, message=message
        )
        job = await dm_h.job_for(submit)
        assert job.prompt == "a lighthouse in fog" and job.parent_id == grid.id


def yes_id(question: dict[str, Any]) -> str:
    """The Yes button of a private "This costs N credits" question."""
    ids = [c["custom_id"] for row in question["components"] for c in row["components"]]
    [found] = [cid for cid in ids if cid.startswith("mj:confirm:") and cid.endswith(":yes")]
    return found


async def test_an_edit_costly_enough_to_ask_starts_the_edited_job_on_yes(h: Harness) -> None:
    # 100 steps is four times the base work: the edit costs 4 credits and asks first. Yes must
    # start what was asked about (the edited prompt), and turn the button that opened it blue.
    grid, message = await finish_grid(h, "a red fox")
    await remix_on(h)
    _press, callback = await press_and_wait(h, f"mj:v:{grid.id}:1", message)
    submit = await h.fake.submit_modal(
        callback.json["data"]["custom_id"], {"prompt": "a blue fox --steps 100 --seed 77"}, message=message
    )
    question = await submit.wait_original()
    assert question["flags"] & EPHEMERAL and "costs 4 credits" in question["content"]
    assert await h.job_count() == 1
    yes, _ = await press_and_wait(h, yes_id(question), question)
    job = await h.job_for(yes)
    assert job.kind == JobKind.VARIATION and job.parent_id == grid.id and job.parent_index == 1
    assert job.prompt == "a blue fox" and job.params["steps"] == 100 and job.cost == 4
    assert job.seed == 77  # the edited seed, not the parent's
    assert await credits_used(h, h.fake.user.id) == 5
    await h.fake.wait_for_message(
        lambda m: m["id"] == message["id"] and styles(m).get(f"mj:v:{grid.id}:1") == 1
    )


async def test_a_bad_edit_after_a_slow_lookup_is_still_refused_privately(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A slow database makes the submit defer before the edit is read: the refusal must still
    # reach the member (and the "thinking…" go away) rather than fail on the answered response.
    grid, message = await finish_grid(h, "a red fox")
    await remix_on(h)
    _press, callback = await press_and_wait(h, f"mj:r:{grid.id}", message)
    monkeypatch.setattr(buttons, "LOOKUP_BUDGET_S", 0.0)
    submit = await h.fake.submit_modal(
        callback.json["data"]["custom_id"], {"prompt": "a red fox --chaos 500"}, message=message
    )
    refusal = await private_followup(h, submit)
    assert "chaos" in refusal["content"] and "Nothing was charged" in refusal["content"]
    assert await h.job_count() == 1 and await credits_used(h, h.fake.user.id) == 1


async def test_stealth_typed_in_an_edit_makes_a_stealth_job(h: Harness) -> None:
    # A public-mode member remixing a public grid asks for privacy: the result must not be public.
    grid, message = await finish_grid(h, "a red fox")
    assert grid.visibility == "public"
    await remix_on(h)
    _press, callback = await press_and_wait(h, f"mj:v:{grid.id}:1", message)
    modal = callback.json["data"]
    submit = await h.fake.submit_modal(modal["custom_id"], {"prompt": "a red fox --stealth"}, message=message)
    assert (await h.job_for(submit)).visibility == "stealth"
