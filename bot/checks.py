"""Who may use a command, decided in code on every use, and the one answer to a refusal.

Admins hold the Manage Server permission in that server, or are listed in ``ADMIN_USER_IDS``.
Discord's own default-permission setting is only a hint that server owners can override, so it
is not relied on. :class:`MirageTree` answers a failed check privately instead of logging it as
an error: a member trying a command they may not use is not a fault.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import discord
from discord import app_commands

from bot.settings import BotSettings

log = logging.getLogger(__name__)

NOT_ADMIN = "Only server admins (Manage Server permission) can use this command."
T = TypeVar("T")


class Refused(app_commands.CheckFailure):
    """A check said no; ``str()`` is the member-facing, ephemeral answer."""


def is_admin(interaction: discord.Interaction[Any], settings: BotSettings) -> bool:
    """Manage Server in this server, or listed in the configured admin ids."""
    if interaction.user.id in settings.admin_user_ids:
        return True
    return interaction.guild_id is not None and interaction.permissions.manage_guild


def admin_only() -> Callable[[T], T]:
    """Decorate an app command so only admins may run it; others get :data:`NOT_ADMIN`."""

    async def predicate(interaction: discord.Interaction[Any]) -> bool:
        settings: BotSettings = interaction.client.settings  # type: ignore[attr-defined]
        if is_admin(interaction, settings):
            return True
        log.info("user %s was refused an admin command", interaction.user.id)
        raise Refused(NOT_ADMIN)

    return app_commands.check(predicate)


class MirageTree(app_commands.CommandTree[Any]):
    """The command tree: answers refused checks privately, logs anything else as discord.py does."""

    async def on_error(
        self, interaction: discord.Interaction[Any], error: app_commands.AppCommandError
    ) -> None:
        """Tell the member why a check refused them; other errors keep the default handling."""
        if isinstance(error, Refused):
            if not interaction.response.is_done():
                await interaction.response.send_message(str(error), ephemeral=True)
            else:
                await interaction.followup.send(str(error), ephemeral=True)
            return
        await super().on_error(interaction, error)
