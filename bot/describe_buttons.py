"""``/describe``'s answer: four numbered prompts and the buttons under them.

``1`` ``2`` ``3`` ``4`` start an ``/imagine`` of that prompt (the picture's ``--ar`` included)
through the normal accept path, checked and charged like any ``/imagine`` (banned words first, and
Yes/No when it costs ``PRICE_CONFIRM_AT`` or more); ``🔄`` describes the same picture again (a new
seed, so new suggestions); ``Imagine all`` asks Yes/No (``bot.confirm``) and then starts the four.
A stealth describe's buttons answer only its owner. The buttons carry only the describe job's id,
so presses work after a restart.
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
from bot.banned_words import banned_words_message, check_prompts
from bot.buttons import JOB_ID_CHARS, load_source
from bot.interactions import DATABASE_ERRORS, DATABASE_UNAVAILABLE, actor_from, refuse
from bot.models import Job, JobInput
from bot.pricing import needs_confirmation
from bot.prompt import PromptError, parse_prompt
from bot.prompt_prefs import prompting_context
from bot.render import cut_escaped, job_head
from bot.results import DESCRIBE_KEY
from bot.storage import MediaNotFound, MediaStore
from workers.schema import GenerationParams, JobKind, Visibility

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
        # Refuses missing and unfinished jobs, and someone else's stealth describe: its 🔄 would
        # show the private picture in the presser's result, its numbers reveal what it shows.
        job = await load_source(interaction, self.job_id)
        if job is None:
            return
        if self.what == "r":
            await describe_again(bot, interaction, job)
            return
        prompts = suggestions(job)
        numbers = range(1, len(prompts) + 1) if self.what == "all" else [int(self.what)]
        if not prompts or numbers[-1] > len(prompts):
            await refuse(interaction, NOT_READY)
            return
        batch: list[GenerationParams] = []
        for number in numbers:
            # Only the pressed suggestions: one unusable suggestion must not block the others.
            try:
                batch.append(keep_stealth(job, parse_prompt(prompts[number - 1])))
            except PromptError as exc:
                log.warning("describe job %s suggested an unusable prompt: %s", job.id, exc)
                await refuse(interaction, f"Suggestion {number} cannot be used as a prompt: {exc}")
                return
        await imagine_suggestions(bot, interaction, batch, ask=self.what == "all")


def keep_stealth(job: Job, params: GenerationParams) -> GenerationParams:
    """``params`` made stealth when ``job`` is: a stealth describe's jobs stay out of the gallery.

    Only the owner can press its buttons, but they may have gone public since; as for their own
    stealth grid's buttons, the private picture (a 🔄's input) and what it shows stay private.
    """
    if job.visibility != Visibility.STEALTH.value:
        return params
    return params.model_copy(update={"visibility": Visibility.STEALTH})


async def imagine_suggestions(
    bot: MirageBot, interaction: discord.Interaction[Any], batch: list[GenerationParams], *, ask: bool
) -> None:
    """Start suggestions as ``/imagine`` does, priced with the presser's own engine.

    Banned words are refused first; Yes/No comes before anything is charged when ``ask`` or when
    they cost ``PRICE_CONFIRM_AT`` or more.
    """
    banned = check_prompts((params.model_prompt for params in batch), bot.jobs.banned_words)
    if banned:
        # Refused before asking: a Yes would start the jobs before the banned one and stop there.
        await refuse(interaction, banned_words_message(banned))
        return
    try:
        async with bot.sessions() as session:
            member, _prefs, settings = await prompting_context(session, actor_from(interaction), bot.settings)
    except DATABASE_ERRORS:
        log.warning("could not read the member of a describe press", exc_info=True)
        await refuse(interaction, DATABASE_UNAVAILABLE)
        return
    cost = bot.flow.imagine_cost(batch, member, settings)
    if ask or needs_confirmation(cost, bot.settings.price_confirm_at):
        await ask_imagine(bot, interaction, batch, cost)
        return
    await bot.flow.imagine(interaction, batch[0])


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
    params = keep_stealth(job, GenerationParams(prompt="", engine=job.engine))
    await bot.flow.accept(
        interaction,
        lambda actor: bot.jobs.create_imagine(actor, params, kind=JobKind.DESCRIBE, inputs=inputs),
    )


async def ask_imagine(
    bot: MirageBot, interaction: discord.Interaction[Any], batch: list[GenerationParams], cost: int
) -> None:
    """Ask Yes/No before the jobs; Yes starts them through ``JobFlow.imagine_many``."""
    credits = f"{cost} credit{'s' if cost != 1 else ''}"
    jobs = f"{len(batch)} job{'s' if len(batch) != 1 else ''}"
    await confirm.ask(
        interaction,
        bot.sessions,
        kind=IMAGINE_ALL_KIND,
        payload={"params": [params.model_dump(mode="json") for params in batch], "inputs": {}},
        question=f"This makes {jobs} and costs {credits}. Start {'them' if len(batch) != 1 else 'it'}?",
        expires_in_s=bot.settings.confirm_expiry_s,
    )
