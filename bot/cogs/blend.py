"""``/blend``: two to five pictures blended into a 2x2 grid, no prompt needed.

Each attachment is read and cleaned by ``bot.imagefetch.read_attachment`` (size, type, pixel
caps; re-encoded without metadata) before anything is charged, stored as the job's inputs in the
job's own transaction, and sent to the engine as a ``BLEND`` job's prompt images. The grid comes
back with the usual U1-U4, 🔄 and V1-V4; 🔄 blends the same pictures again. ``dimensions`` picks
Midjourney's portrait (2:3), square (1:1) or landscape (3:2).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.imagefetch import FetchedImage, FetchLimits, ImageInputError, read_attachment
from bot.inputs import store_inputs
from bot.interactions import refuse
from bot.worker_request import IMAGE_ROLE
from workers.schema import GenerationParams, JobKind, nearest_bucket

if TYPE_CHECKING:
    from bot.client import MirageBot

log = logging.getLogger(__name__)

Dimensions = Literal["portrait", "square", "landscape"]
ASPECTS: dict[str, tuple[int, int]] = {"portrait": (2, 3), "square": (1, 1), "landscape": (3, 2)}


def blend_params(dimensions: str | None) -> GenerationParams:
    """A blend's parameters: no text; the aspect only when asked (else the member's default)."""
    if dimensions is None:
        return GenerationParams(prompt="")
    aspect = ASPECTS[dimensions]
    width, height = nearest_bucket(*aspect)
    return GenerationParams(prompt="", aspect=aspect, width=width, height=height)


class Blend(commands.Cog):
    """``/blend``."""

    def __init__(self, bot: MirageBot) -> None:
        self.bot = bot
        self.limits = FetchLimits.from_settings(bot.settings)

    @app_commands.command(name="blend", description="Blend 2 to 5 pictures into four new images")
    @app_commands.describe(
        image1="First picture",
        image2="Second picture",
        image3="Third picture (optional)",
        image4="Fourth picture (optional)",
        image5="Fifth picture (optional)",
        dimensions="Shape of the result: portrait 2:3, square 1:1 or landscape 3:2",
    )
    async def blend(
        self,
        interaction: discord.Interaction,
        image1: discord.Attachment,
        image2: discord.Attachment,
        image3: discord.Attachment | None = None,
        image4: discord.Attachment | None = None,
        image5: discord.Attachment | None = None,
        dimensions: Dimensions | None = None,
    ) -> None:
        """Read every picture, then accept a blend job through the shared ``JobFlow``."""
        attachments = [a for a in (image1, image2, image3, image4, image5) if a is not None]
        # Reading pictures can take seconds: answer Discord's 3-second deadline first.
        await interaction.response.defer(thinking=True)
        try:
            pictures: list[FetchedImage] = [
                await read_attachment(attachment, index, limits=self.limits)
                for index, attachment in enumerate(attachments, start=1)
            ]
        except ImageInputError as exc:
            await refuse(interaction, f"{exc} Nothing was charged.")
            return
        inputs = await store_inputs(self.bot.store, {IMAGE_ROLE: pictures})
        params = blend_params(dimensions)
        await self.bot.flow.accept(
            interaction,
            lambda actor: self.bot.jobs.create_imagine(actor, params, kind=JobKind.BLEND, inputs=inputs),
        )


async def setup(bot: MirageBot) -> None:
    """Extension entry point."""
    await bot.add_cog(Blend(bot))
