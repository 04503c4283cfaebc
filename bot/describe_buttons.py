"""``/describe``'s answer: four numbered prompts and the buttons under them.

``1`` ``2`` ``3`` ``4`` start an ``/imagine`` of that prompt (the picture's ``--ar`` included)
through the normal accept path, charged like any ``/imagine``; ``🔄`` describes the same picture
again (a new seed, so new suggestions); ``Imagine all`` asks Yes/No (``bot.confirm``) and then
starts the four. The buttons carry only the describe job's id, so presses work after a restart.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

import discord
from discord import ui
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot import confirm
from bot.buttons import JOB_ID_CHARS, MISSING_JOB, load_job
from bot.interactions import refuse
from bot.models import Job, JobInput, JobStatus
from bot.prompt import PromptError, parse_prompt
from bot.render import cut_escaped, job_head
from bot.results import DESCRIBE_KEY
from bot.storage import MediaNotFound, MediaStore
from workers.schema import GenerationParams, JobKind

if TYPE_CHECKING:
    from bot.client import MirageBot

log = logging.getLogger(__name__)

NUMBERS = ("1️⃣", "2️⃣", "3️⃣", "4️⃣")
MAX_SHOWN = 450  # a suggestion's characters shown; four fit one message with room to spare
IMAGINE_ALL_KIND = "imagine"  # the /imagine cog's confirmation kind: Yes starts the batch
NOT_READY = "These suggestions are not ready yet."
TEMPLATE = rf"mj:desc:(?P<id>{JOB_ID_CHARS}):(?P<what>[1-4]|r|all)"


def suggestions(job: Job) -> list[str]:
    """The prompts a finished describe job suggested (each ending in ``--ar W:H``)."""
    found = (job.params or {}).get(DESCRIBE_KEY) or {}
    prompts = found.get("prompts") if isinstance(found, dict) else None
    return [str(text) for text in prompts if str(text).strip()] if isinstance(prompts, list) else []


def describe_content(job: Job) -> str:
    """``**Describe** - <@member>`` and the numbered suggestions, escaped and bounded."""
    lines = [job_head(job)]
    for number, text in zip(NUMBERS, suggestions(job), strict=False):
        # Bounded after escaping: a caption's underscores double, and four of them must still fit
        # in one message.
        escaped = discord.utils.escape_markdown(discord.utils.escape_mentions(text))
        lines.append(f"{number} {cut_escaped(escaped, MAX_SHOWN)}")
    return "\n".join(lines)


def describe_view(job: Job) -> ui.View:
    """Row 1: one button per suggestion and 🔄; row 2: Imagine all."""
    view = ui.View(timeout=None)
    count = len(suggestions(job))
    for number in range(1, count + 1):
        view.add_item(DescribeButton(job.id, str(number)))
    view.add_item(DescribeButton(job.id, "r"))
    if count:
        view.add_item(DescribeButton(job.id, "all"))
    return view


class DescribeButton(ui.DynamicItem[ui.Button[Any]], template=TEMPLATE):
    """One of ``1``-``4``, ``🔄`` and ``Imagine all`` under a describe job's answer."""

    def __init__(self, job_id: str, what: str) -> None:
        self.job_id = job_id
        self.what = what
        if what == "r":
            button: ui.Button[Any] = ui.Button(emoji="🔄", row=0)
        elif what == "all":
            button = ui.Button(label="Imagine all", row=1)
        else:
            button = ui.Button(label=what, row=0)
        button.custom_id = f"mj:desc:{job_id}:{what}"
        button.style = discord.ButtonStyle.secondary
        super().__init__(button)

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction[Any], item: ui.Item[Any], match: re.Match[str], /
    ) -> DescribeButton:
        """Rebuild the button from its custom_id."""
        return cls(match["id"], match["what"])

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        """Start the chosen prompt, describe again, or ask about imagining all four."""
        bot: MirageBot = interaction.client  # type: ignore[assignment]
        job = await load_job(bot, self.job_id)
        if job is None:
            await refuse(interaction, MISSING_JOB)
            return
        if self.what == "r":
            await describe_again(bot, interaction, job)
            return
        prompts = suggestions(job)
        if job.status != JobStatus.DONE.value or not prompts:
            await refuse(interaction, NOT_READY)
            return
        try:
            batch = [parse_prompt(text) for text in prompts]
        except PromptError as exc:
            log.warning("describe job %s suggested an unusable prompt: %s", job.id, exc)
            await refuse(interaction, f"That suggestion cannot be used as a prompt: {exc}")
            return
        if self.what == "all":
            await ask_imagine_all(bot, interaction, batch)
            return
        index = int(self.what) - 1
        if index >= len(batch):
            await refuse(interaction, NOT_READY)
            return
        await bot.flow.imagine(interaction, batch[index])


async def described_picture(
    sessions: async_sessionmaker[AsyncSession], store: MediaStore, job_id: str
) -> tuple[bytes, str] | None:
    """The picture a describe job was given (stored as PNG), or None when it is gone."""
    async with sessions() as session:
        row = (await session.scalars(select(JobInput).where(JobInput.job_id == job_id).limit(1))).first()
    if row is None:
        return None
    try:
        return await store.get(row.key), "png"
    except MediaNotFound:
        log.warning("describe job %s: its picture %s is gone", job_id, row.key)
        return None


async def describe_again(bot: MirageBot, interaction: discord.Interaction[Any], job: Job) -> None:
    """🔄: a new describe job of the same stored picture, charged like ``/describe``."""
    async with bot.sessions() as session:
        rows = (await session.scalars(select(JobInput).where(JobInput.job_id == job.id))).all()
    inputs: dict[str, list[str]] = {}
    for row in sorted(rows, key=lambda row: (row.role, row.index)):
        inputs.setdefault(row.role, []).append(row.key)
    if not inputs:
        await refuse(interaction, "The picture of this description is no longer available.")
        return
    params = GenerationParams(prompt="", engine=job.engine)
    await bot.flow.accept(
        interaction,
        lambda actor: bot.jobs.create_imagine(actor, params, kind=JobKind.DESCRIBE, inputs=inputs),
    )


async def ask_imagine_all(
    bot: MirageBot, interaction: discord.Interaction[Any], batch: list[GenerationParams]
) -> None:
    """Ask Yes/No before four jobs; Yes starts them through ``JobFlow.imagine_many``."""
    cost = sum(bot.jobs.cost_of(JobKind.IMAGINE, bot.settings.default_engine) for _params in batch)
    credits = f"{cost} credit{'s' if cost != 1 else ''}"
    await confirm.ask(
        interaction,
        bot.sessions,
        kind=IMAGINE_ALL_KIND,
        payload={"params": [params.model_dump(mode="json") for params in batch], "inputs": {}},
        question=f"This makes {len(batch)} jobs and costs about {credits}. Start them?",
        expires_in_s=bot.settings.confirm_expiry_s,
    )
