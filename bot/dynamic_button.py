"""The base of the buttons whose custom_id is ``mj:<prefix>:<job id>`` and nothing more.

Custom Zoom, Vary (Region), Web, ❤️ and Cancel differ only in their prefix, their look and what a
press does, so a subclass names the first two in its class line and writes the third::

    class RegionButton(JobIdButton, prefix="region", label="Vary (Region)", emoji="🖌️"): ...

The custom_ids are those of buttons already posted on Discord: a press on one after a restart is
routed by them, so their shape must never change. The job action buttons, which carry an argument
too, are :class:`bot.buttons.JobButton`.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Self

import discord
from discord import ui

from bot.buttons import JOB_ID_CHARS


# The base's own template is required by discord.py but never routed: only subclasses are
# registered (``bot.views``), each with the template its prefix makes.
class JobIdButton(ui.DynamicItem[ui.Button[Any]], template=rf"mj:[a-z]+:(?P<id>{JOB_ID_CHARS})"):
    """A secondary button acting on one job, ``mj:<prefix>:<job id>``; subclasses write ``callback``."""

    custom_id_prefix: ClassVar[str]
    button_label: ClassVar[str | None]
    button_emoji: ClassVar[str | None]

    def __init_subclass__(cls, *, prefix: str, label: str | None = None, emoji: str | None = None) -> None:
        super().__init_subclass__(template=rf"mj:{prefix}:(?P<id>{JOB_ID_CHARS})")
        cls.custom_id_prefix, cls.button_label, cls.button_emoji = prefix, label, emoji

    def __init__(self, job_id: str, *, row: int | None = None) -> None:
        self.job_id = job_id
        super().__init__(
            ui.Button(
                label=self.button_label,
                emoji=self.button_emoji,
                custom_id=f"mj:{self.custom_id_prefix}:{job_id}",
                style=discord.ButtonStyle.secondary,
                row=row,
            )
        )

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction[Any], item: ui.Item[Any], match: re.Match[str], /
    ) -> Self:
        """Rebuild the button from its custom_id (called by discord.py on a press)."""
        return cls(match["id"])
