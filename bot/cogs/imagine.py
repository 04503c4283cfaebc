"""``/imagine``: parse the prompt, then accept the job through the shared ``JobFlow``."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

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
        await self.bot.flow.imagine(interaction, params)


async def setup(bot: MirageBot) -> None:
    """Extension entry point."""
    await bot.add_cog(Imagine(bot))
