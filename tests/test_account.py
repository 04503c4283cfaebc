"""A member's own commands: ``/info``, ``/settings``, ``/stealth``, ``/public``, ``/gallery``."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from bot import global_defaults
from bot.models import Job, Member
from tests.botutil import (
    EPHEMERAL,
    Harness,
    custom_ids,
    finish_grid,
    reply_of,
)
from workers.schema import JobKind

pytestmark = pytest.mark.timeout(60)


async def test_info_shows_credits_jobs_and_mode(h: Harness) -> None:
    await h.job_for(await h.imagine("something"))
    inter = await h.fake.slash("info")
    callback = await inter.callback()
    assert callback.callback_type == 5 and callback.json["data"]["flags"] & EPHEMERAL
    text = (await reply_of(h, inter))["content"]
    assert "Credits: **24** left (1 of 25 used this day)" in text
    assert "<t:" in text
    assert "queued" in text and "Visibility: **public**" in text and "Stable Diffusion XL" in text


async def test_stealth_public_and_settings(h: Harness) -> None:
    inter = await h.fake.slash("stealth")
    assert "Stealth mode is on" in (await reply_of(h, inter))["content"]
    job = await h.job_for(await h.imagine("hidden by default"))
    assert job.visibility == "stealth"
    inter = await h.fake.slash("public")
    assert "Public mode is on" in (await reply_of(h, inter))["content"]

    inter = await h.fake.slash("settings")
    payload = await reply_of(h, inter)
    assert "Your Mirage settings" in payload["content"]
    panel = await inter.wait_original(lambda m: bool(m.get("components")))
    selects = custom_ids(panel)
    assert len(selects) == 4  # engine, visibility, aspect, the Remix switch
    press = await h.fake.press(selects[2], panel, values=["16:9"])
    await press.callback()
    async with h.sessions() as session:
        member = (await session.scalars(select(Member).where(Member.user_id == h.fake.user.id))).one()
    assert member.default_aspect == "16:9"
    job = await h.job_for(await h.imagine("uses the default aspect"))
    assert tuple(job.params["aspect"]) == (16, 9)
    # Someone else cannot use my settings panel.
    bob = h.fake.add_member(h.fake.guild, "bob").user
    panel = await inter.wait_original(lambda m: custom_ids(m) and custom_ids(m) != selects)
    press = await h.fake.press(custom_ids(panel)[0], panel, values=["openai"], user=bob)
    callback = await press.callback()
    assert callback.message_payload["flags"] & EPHEMERAL


async def test_gallery_links_member_page_and_latest_jobs(h: Harness) -> None:
    public, _ = await finish_grid(h, "for everyone")
    stealth, _ = await finish_grid(h, "just for me --stealth")
    inter = await h.fake.slash("gallery")
    text = (await reply_of(h, inter))["content"]
    async with h.sessions() as session:
        member = (await session.scalars(select(Member).where(Member.user_id == h.fake.user.id))).one()
    assert f"http://gallery.test/m/{member.public_id}" in text
    assert f"http://gallery.test/j/{public.id}" in text
    assert "just for me" in text and f"/j/{stealth.id}" not in text


async def test_gallery_lists_a_job_without_a_prompt_without_empty_bold(h: Harness) -> None:
    # /describe and /blend jobs have no prompt: no "****" (which Discord shows literally).
    grid, _ = await finish_grid(h, "soon wordless")
    async with h.sessions() as session, session.begin():
        row = await session.get(Job, grid.id)
        assert row is not None
        row.prompt, row.kind = "", JobKind.DESCRIBE.value
    text = (await reply_of(h, await h.fake.slash("gallery")))["content"]
    assert "****" not in text and "• describe <t:" in text


async def test_settings_shows_the_owners_global_defaults(h: Harness) -> None:
    # /mirage defaults: what the member's jobs get while they have no default of their own.
    async with h.sessions() as session, session.begin():
        await global_defaults.store(session, default_engine="openai", default_visibility="stealth")
    job = await h.job_for(await h.imagine("made with the global defaults"))
    assert job.engine == "openai" and job.visibility == "stealth"
    inter = await h.fake.slash("settings")
    text = (await reply_of(h, inter))["content"]
    assert "Default engine: **OpenAI images**" in text and "Visibility: **stealth**" in text
    panel = await inter.wait_original(lambda m: bool(m.get("components")))
    chosen = [
        option["value"]
        for row in panel["components"]
        for select in row["components"]
        for option in select.get("options") or []
        if option.get("default")
    ]
    assert chosen[:2] == ["openai", "stealth"]
