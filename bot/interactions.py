"""Small helpers every command and button shares for answering an interaction."""

from __future__ import annotations

import logging
from typing import Any

import discord
from sqlalchemy.exc import SQLAlchemyError

from bot.content_rules import channel_is_nsfw
from bot.operations import Actor

log = logging.getLogger(__name__)

# Said when the database cannot be reached while accepting a job: the job row and its charge are
# one transaction, so nothing was created or charged, and the member should simply retry.
DATABASE_UNAVAILABLE = (
    "Mirage can't reach its database right now, so this was not started and nothing was charged. "
    "Please try again in a minute."
)
# What an unreachable database raises: SQLAlchemy wraps driver errors; a refused or reset socket
# can surface as OSError, and a hung one as a timeout.
DATABASE_ERRORS: tuple[type[BaseException], ...] = (SQLAlchemyError, OSError, TimeoutError)


def actor_from(interaction: discord.Interaction[Any]) -> Actor:
    """The facts of an interaction that a job keeps (who, where, and how to answer later)."""
    user = interaction.user
    return Actor(
        guild_id=interaction.guild_id or 0,
        channel_id=interaction.channel_id or 0,
        user_id=user.id,
        display_name=getattr(user, "display_name", None) or user.name,
        application_id=interaction.application_id,
        interaction_token=interaction.token,
        channel_nsfw=channel_is_nsfw(interaction.channel),
    )


async def refuse(interaction: discord.Interaction[Any], message: str) -> None:
    """An ephemeral refusal, whether or not the interaction was answered already.

    After a public deferral the first followup would edit the public "thinking…" message, so
    that message is deleted first and the refusal sent as a fresh ephemeral followup.
    """
    if not interaction.response.is_done():
        await interaction.response.send_message(message, ephemeral=True)
        return
    try:
        await interaction.delete_original_response()
    except discord.HTTPException:
        log.debug("could not delete the deferred response", exc_info=True)
    await interaction.followup.send(message, ephemeral=True)
