"""``/prefer`` and the /settings Remix switch: stored per member, validated, applied to prompts."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from bot.models import Member
from bot.prompt import plan_prompts
from bot.prompt_prefs import (
    Prefs,
    append_suffix,
    apply_prefs,
    check_option_name,
    check_parameters,
    expand_options,
)
from tests.botutil import EPHEMERAL, Harness, credits_used, custom_ids, reply_of

pytestmark = pytest.mark.timeout(90)


async def prefer(h: Harness, subcommand: str, **options: Any) -> dict[str, Any]:
    """Run ``/prefer <subcommand>`` and return its private answer."""
    inter = await h.fake.slash("prefer", options, subcommand=subcommand)
    payload = (await inter.callback()).message_payload
    assert payload["flags"] & EPHEMERAL
    return payload


def test_suffix_parameters_the_prompt_sets_itself_are_left_out() -> None:
    assert append_suffix("a fox --ar 1:1", "--ar 16:9 --chaos 5") == "a fox --ar 1:1 --chaos 5"
    assert append_suffix("a fox --aspect 1:1", "--ar 16:9") == "a fox --aspect 1:1"
    assert append_suffix("a fox", "") == "a fox"


def test_options_expand_once_before_the_suffix() -> None:
    prefs = Prefs(suffix="--stylize 50", options={"wide": "--ar 21:9 --stylize 400", "loop": "--loop"})
    assert apply_prefs("a fox --wide", prefs) == "a fox --ar 21:9 --stylize 400"
    assert expand_options("a fox --loop", {"loop": "--loop"}) == "a fox --loop"
    assert expand_options("a fox --Wide", prefs.options) == "a fox --ar 21:9 --stylize 400"


@pytest.mark.parametrize(
    ("name", "problem"), [("ar", "built-in"), ("9lives", "not a valid"), ("a b", "not a valid")]
)
def test_option_names_are_checked(name: str, problem: str) -> None:
    assert problem in (check_option_name(name) or "")


async def test_an_option_is_saved_listed_used_and_deleted(h: Harness) -> None:
    said = await prefer(h, "option set", name="wide", value="--ar 16:9 --chaos 10")
    assert said["content"] == "`--wide` now means `--ar 16:9 --chaos 10`."
    assert "`--wide` = `--ar 16:9 --chaos 10`" in (await prefer(h, "option list"))["content"]
    job = await h.job_for(await h.imagine("a long road --wide"))
    assert (
        job.prompt == "a long road" and tuple(job.params["aspect"]) == (16, 9) and job.params["chaos"] == 10
    )
    assert (await prefer(h, "option delete", name="wide"))["content"] == "`--wide` is deleted."
    inter = await h.imagine("a long road --wide")
    assert "`--wide` is not a known parameter" in (await inter.callback()).message_payload["content"]


async def test_a_bad_option_or_suffix_is_refused_and_not_saved(h: Harness) -> None:
    said = await prefer(h, "option set", name="bad", value="--chaos 500")
    assert "was not saved" in said["content"] and "chaos" in said["content"]
    said = await prefer(h, "suffix", value="a cat --ar 3:2")
    assert "parameters only" in said["content"]
    assert "no custom options" in (await prefer(h, "option list"))["content"]
    assert await credits_used(h, h.fake.user.id) == 0


async def test_the_suffix_is_added_to_every_prompt_and_can_be_cleared(h: Harness) -> None:
    assert (
        "ends with `--ar 3:2 --stylize 250`"
        in (await prefer(h, "suffix", value="--ar 3:2 --stylize 250"))["content"]
    )
    job = await h.job_for(await h.imagine("a fox --ar 1:1"))
    assert tuple(job.params["aspect"]) == (1, 1) and job.params["stylize"] == 250
    assert (await prefer(h, "suffix"))["content"] == "Your suffix is cleared."
    job = await h.job_for(await h.imagine("another fox"))
    assert job.params["stylize"] == 100


async def test_prefer_remix_and_the_settings_switch_toggle_the_same_setting(h: Harness) -> None:
    assert "**on**" in (await prefer(h, "remix"))["content"]
    inter = await h.fake.slash("settings")
    payload = await reply_of(h, inter)
    assert "Remix mode: **on**" in payload["content"]
    panel = await inter.wait_original(lambda m: bool(m.get("components")))
    switch = custom_ids(panel)[3]
    press = await h.fake.press(switch, panel)
    callback = await press.callback()
    assert "Remix mode: **off**" in callback.message_payload["content"]
    async with h.sessions() as session:
        member = (await session.scalars(select(Member).where(Member.user_id == h.fake.user.id))).one()
    assert member.remix is False


@pytest.mark.parametrize("value", ["--no {a", "--no a}", "--no {a, {b}"])
def test_a_value_with_unbalanced_braces_is_refused_when_set(value: str) -> None:
    # Saved, it would make every later prompt fail on a brace the member never typed there.
    problem = check_parameters(value)
    assert problem is not None and ("`{`" in problem or "`}`" in problem)


@pytest.mark.parametrize(
    ("prompt", "suffix"),
    [
        ("a fox --relax", "--fast"),
        ("a fox --public", "--stealth"),
        ("a fox --v 6", "--niji 6"),
        ("a fox --niji", "--version 6"),
        ("a fox --style cinematic", "--raw"),
        ("a fox --raw", "--style cinematic"),
        ("a fox --repeat 2", "--r 3"),
        ("a fox --personalize", "--p"),
        ("a fox -—ar 1:1", "--ar 3:2"),  # dashes as the parser reads them: "---" on a phone
    ],
)
def test_the_prompt_wins_over_a_suffix_parameter_it_contradicts(prompt: str, suffix: str) -> None:
    assert append_suffix(prompt, f"{suffix} --chaos 5") == f"{prompt} --chaos 5"
    plan_prompts(apply_prefs(prompt, Prefs(suffix=f"{suffix} --chaos 5")))  # parses


async def test_a_long_option_list_fits_discords_messages(h: Harness) -> None:
    values = {f"opt{n:02d}": "--no " + ", ".join(["a very long word list"] * 21) for n in range(25)}
    for name, value in values.items():
        assert "now means" in (await prefer(h, "option set", name=name, value=value))["content"]
    await prefer(h, "suffix", value=values["opt00"])
    inter = await h.fake.slash("prefer", {}, subcommand="option list")
    assert (await inter.callback()).status < 300  # Discord refuses a message over 2000 characters
    await h.fake.wait_for_request(  # the suffix comes last
        lambda r: r.interaction_token == inter.token and "Suffix:" in str(r.message_payload.get("content"))
    )
    sent = [
        r.message_payload.get("content") or ""
        for r in h.fake.requests
        if r.interaction_token == inter.token and r.route in ("interaction_callback", "webhook_execute")
    ]
    assert sent and all(r.status < 300 for r in h.fake.requests if r.interaction_token == inter.token)
    text = "\n".join(sent)
    assert all(len(content) <= 2000 for content in sent)
    assert all(f"`--{name}` = `{value}`" in text for name, value in values.items())
    assert f"Suffix: `{values['opt00']}`" in text
