"""``/imagine``: parse, defer, accept (job + charge in one transaction), then dispatch."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.buttons import DATABASE_ERRORS, DATABASE_UNAVAILABLE, actor_from, refuse
from bot.jobs import JobRefused
from bot.prompt import PromptError, parse_prompt

if TYPE_CHECKING:
    from bot.client import MirageBot

log = logging.getLogger(__name__)


class Imagine(commands.Cog):
    """The one command members use most."""

    def __init__(self, bot: MirageBot) -> None:
        self.bot = bot

    @app_commands.command(name="imagine", description="Create four images from a prompt")
    @app_commands.describe(prompt="What to imagine; parameters go at the end: --ar 3:2 --seed 7 --no text")
    async def imagine(
        self, interaction: discord.Interaction, prompt: app_commands.Range[str, 1, 4000]
    ) -> None:
        """Parse the prompt; a mistake is answered privately and costs nothing."""
        try:
            params = parse_prompt(prompt)
        except PromptError as exc:
            await interaction.response.send_message(str(exc), ephemeral=True)
            return
        # Defer before touching the database: Discord's 3-second deadline holds even when the
        # database is busy with a burst of other interactions.
        await interaction.response.defer(thinking=True)
        try:
            created = await self.bot.jobs.create_imagine(actor_from(interaction), params)
        except JobRefused as exc:
            await refuse(interaction, str(exc))
            return
        except DATABASE_ERRORS:
            # The job and its charge are one transaction, so nothing was created or charged; say
            # so rather than leaving the deferred "thinking…" message hanging forever (SPEC §3).
            log.exception("could not accept /imagine: database unavailable")
            await refuse(interaction, DATABASE_UNAVAILABLE)
            return
        job = created.job
        self.bot.delivery.remember_limit(job.id, interaction.filesize_limit)
        await self.bot.delivery.show_waiting(job, created.position)
        await self.bot.jobs.release(job.member_id)
        self.bot.delivery.wake()


async def setup(bot: MirageBot) -> None:
    """Extension entry point."""
    await bot.add_cog(Imagine(bot))
