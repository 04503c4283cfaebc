"""``/describe``: four prompt suggestions for a picture (an attachment or a link).

The picture is read and cleaned by ``bot.imagefetch`` (attachments with ``read_attachment``,
links with the guarded ``fetch_image``), stored, and sent to the engine's describe task as a
``DESCRIBE`` job (``COST_DESCRIBE`` credits, none by default). The answer and its buttons are
``bot.describe_buttons``. A picture that cannot be used is refused privately and costs nothing.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.describe_buttons import DescribeButton
from bot.imagefetch import (
    FetchedImage,
    FetchLimits,
    ImageInputError,
    fetch_image,
    image_label,
    read_attachment,
)
from bot.inputs import store_inputs
from bot.interactions import refuse
from bot.worker_request import IMAGE_ROLE
from workers.schema import GenerationParams, JobKind

if TYPE_CHECKING:
    from bot.client import MirageBot

log = logging.getLogger(__name__)

ONE_PICTURE = "Give one picture to describe: attach it as `image` or paste its address as `link` (not both)."


class Describe(commands.Cog):
    """``/describe`` and its buttons."""

    def __init__(self, bot: MirageBot) -> None:
        self.bot = bot
        self.limits = FetchLimits.from_settings(bot.settings)
        self.allow_addresses: tuple[str, ...] = ()  # tests allow their local image server

    @app_commands.command(name="describe", description="Four prompts that could have made a picture")
    @app_commands.describe(image="The picture to describe", link="Or the address of a picture on the web")
    async def describe(
        self,
        interaction: discord.Interaction,
        image: discord.Attachment | None = None,
        link: app_commands.Range[str, 1, 2000] | None = None,
    ) -> None:
        """Read the picture, then accept a describe job through the shared ``JobFlow``."""
        if (image is None) == (link is None):
            await interaction.response.send_message(ONE_PICTURE, ephemeral=True)
            return
        # Reading a picture can take seconds: answer Discord's 3-second deadline first.
        await interaction.response.defer(thinking=True)
        try:
            picture = await self._read(image, link)
        except ImageInputError as exc:
            await refuse(interaction, f"{exc} Nothing was charged.")
            return
        inputs = await store_inputs(self.bot.store, {IMAGE_ROLE: [picture]})
        params = GenerationParams(prompt="")
        await self.bot.flow.accept(
            interaction,
            lambda actor: self.bot.jobs.create_imagine(actor, params, kind=JobKind.DESCRIBE, inputs=inputs),
        )

    async def _read(self, image: discord.Attachment | None, link: str | None) -> FetchedImage:
        if image is not None:
            return await read_attachment(image, 1, limits=self.limits)
        assert link is not None
        return await fetch_image(
            link.strip(),
            label=image_label(None, link.strip()),
            limits=self.limits,
            allow_addresses=self.allow_addresses,
        )


async def setup(bot: MirageBot) -> None:
    """Extension entry point: the command and its buttons (presses survive restarts)."""
    bot.add_dynamic_items(DescribeButton)
    await bot.add_cog(Describe(bot))
