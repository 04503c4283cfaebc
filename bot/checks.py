"""Who may use a command, decided in code on every use, and the one answer to a refusal.

Admins hold the Manage Server permission in a server the bot's owners approved (listed in
``ALLOWED_GUILD_IDS`` or approved with ``/mirage guild approve``), or are listed in
``ADMIN_USER_IDS`` or ``OWNER_USER_IDS``: inviting the bot to one's own server gives no power over
credits.
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

from bot.access import guild_approved, is_owner
from bot.settings import BotSettings

log = logging.getLogger(__name__)

NOT_ADMIN = (
    "Only server admins (Manage Server permission) of a server the bot's owner approved can use this command."
)
T = TypeVar("T")


class Refused(app_commands.CheckFailure):
    """A check said no; ``str()`` is the member-facing, ephemeral answer."""


def is_admin(interaction: discord.Interaction[Any], settings: BotSettings) -> bool:
    """Listed as an admin or owner, or Manage Server here (approval is checked by :func:`may_admin`)."""
    if interaction.user.id in settings.admin_user_ids or is_owner(settings, interaction.user.id):
        return True
    return interaction.guild_id is not None and interaction.permissions.manage_guild


async def may_admin(interaction: discord.Interaction[Any], settings: BotSettings) -> bool:
    """Whether the user may run admin commands here: listed, or Manage Server in an approved guild."""
    if interaction.user.id in settings.admin_user_ids or is_owner(settings, interaction.user.id):
        return True
    if not is_admin(interaction, settings) or interaction.guild_id is None:
        return False
    sessions = interaction.client.sessions  # type: ignore[attr-defined]
    async with sessions() as session:
        return await guild_approved(session, settings, interaction.guild_id)


def admin_only() -> Callable[[T], T]:
    """Decorate an app command so only admins may run it; others get :data:`NOT_ADMIN`."""

    async def predicate(interaction: discord.Interaction[Any]) -> bool:
        settings: BotSettings = interaction.client.settings  # type: ignore[attr-defined]
        if await may_admin(interaction, settings):
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
