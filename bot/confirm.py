"""Yes / No before something costly: a question whose answer survives a bot restart.

The question is a row in ``pending_confirmations`` (who may answer, what kind of action, the
action's plain-data payload, when it expires); the buttons carry only the row's id, as
``mj:confirm:<id>:yes|no``, and are a ``DynamicItem``, so a press after a restart still finds
its action. Answering deletes the row in the same statement that reads it, so a double press
(or two bot processes) acts once.

Using it::

    from bot import confirm

    async def start(interaction, payload):  # the Yes press, not yet answered
        ...

    confirm.on_confirm("upscale4x", start)          # once, at import time
    await confirm.ask(interaction, sessions, kind="upscale4x", payload={...},
                      question="This costs 6 credits. Go ahead?", expires_in_s=600)

No answers "Cancelled; nothing was charged." itself; an expired or already answered question
says so. A handler must charge only inside its own accept path (nothing is charged on asking).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import discord
from discord import ui
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.interactions import refuse
from bot.models import PendingConfirmation, utcnow

log = logging.getLogger(__name__)

ConfirmHandler = Callable[[discord.Interaction[Any], dict[str, Any]], Awaitable[None]]

TEMPLATE = r"mj:confirm:(?P<id>[A-Za-z0-9_-]{1,32}):(?P<answer>yes|no)"
CANCELLED = "Cancelled; nothing was charged."
EXPIRED = "This question has expired or was already answered; nothing was charged. Run the command again."
NOT_YOURS = "Only the member who was asked can answer this."
UNKNOWN_KIND = "This question can no longer be answered (the bot was updated); nothing was charged."

_HANDLERS: dict[str, ConfirmHandler] = {}


def on_confirm(kind: str, handler: ConfirmHandler) -> None:
    """Register what a Yes does for questions of ``kind`` (call at import time, once per kind)."""
    _HANDLERS[kind] = handler


def custom_id(confirmation_id: str, answer: str) -> str:
    """The button id for an answer (``yes`` or ``no``)."""
    return f"mj:confirm:{confirmation_id}:{answer}"


def confirmation_view(confirmation_id: str) -> ui.View:
    """The Yes / No buttons under a question (stopped: presses are routed by the template)."""
    view = ui.View(timeout=None)
    view.add_item(ConfirmButton(confirmation_id, "yes"))
    view.add_item(ConfirmButton(confirmation_id, "no"))
    view.stop()
    return view


async def create(
    sessions: async_sessionmaker[AsyncSession],
    *,
    kind: str,
    user_id: int,
    payload: dict[str, Any],
    expires_in_s: float,
) -> str:
    """Store a pending question; returns its id. Questions nobody answered in time go first."""
    await purge_expired(sessions)
    async with sessions() as session, session.begin():
        row = PendingConfirmation(
            user_id=user_id,
            kind=kind,
            payload=payload,
            created_at=utcnow(),
            expires_at=utcnow() + timedelta(seconds=expires_in_s),
        )
        session.add(row)
        await session.flush()
        return row.id


async def ask(
    interaction: discord.Interaction[Any],
    sessions: async_sessionmaker[AsyncSession],
    *,
    kind: str,
    payload: dict[str, Any],
    question: str,
    expires_in_s: float,
) -> str:
    """Store the question and show it privately with Yes / No; returns its id."""
    confirmation_id = await create(
        sessions, kind=kind, user_id=interaction.user.id, payload=payload, expires_in_s=expires_in_s
    )
    view = confirmation_view(confirmation_id)
    if interaction.response.is_done():
        await interaction.followup.send(question, view=view, ephemeral=True)
    else:
        await interaction.response.send_message(question, view=view, ephemeral=True)
    return confirmation_id


async def take(
    sessions: async_sessionmaker[AsyncSession], confirmation_id: str, user_id: int
) -> PendingConfirmation | str:
    """Claim a question for answering: the row (now deleted), or why it cannot be answered."""
    async with sessions() as session, session.begin():
        query = select(PendingConfirmation).where(PendingConfirmation.id == confirmation_id)
        row = await session.scalar(query)
        if row is None:
            return EXPIRED
        if row.user_id != user_id:
            return NOT_YOURS
        deleted = await session.execute(
            delete(PendingConfirmation).where(PendingConfirmation.id == confirmation_id)
        )
        # Another process answered between the read and the delete: only one may act.
        if getattr(deleted, "rowcount", 1) != 1:
            return EXPIRED
        if row.expires_at <= utcnow():
            return EXPIRED
        return row


async def purge_expired(sessions: async_sessionmaker[AsyncSession]) -> int:
    """Delete questions nobody answered in time; returns how many."""
    async with sessions() as session, session.begin():
        result = await session.execute(
            delete(PendingConfirmation).where(PendingConfirmation.expires_at <= utcnow())
        )
        return int(getattr(result, "rowcount", 0) or 0)


class ConfirmButton(ui.DynamicItem[ui.Button[Any]], template=TEMPLATE):
    """Yes or No under a question; the row id in the custom_id finds the pending action."""

    def __init__(self, confirmation_id: str, answer: str) -> None:
        self.confirmation_id, self.answer = confirmation_id, answer
        yes = answer == "yes"
        super().__init__(
            ui.Button(
                label="Yes" if yes else "No",
                style=discord.ButtonStyle.success if yes else discord.ButtonStyle.secondary,
                custom_id=custom_id(confirmation_id, answer),
            )
        )

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction[Any], item: ui.Item[Any], match: re.Match[str], /
    ) -> ConfirmButton:
        """Rebuild the button from its custom_id (after a restart too)."""
        return cls(match["id"], match["answer"])

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        """Claim the question, then cancel or run the registered action."""
        sessions = interaction.client.sessions  # type: ignore[attr-defined]
        claimed = await take(sessions, self.confirmation_id, interaction.user.id)
        if isinstance(claimed, str):
            await refuse(interaction, claimed)
            return
        if self.answer == "no":
            await interaction.response.edit_message(content=CANCELLED, view=None)
            return
        handler = _HANDLERS.get(claimed.kind)
        if handler is None:
            log.warning("no handler for confirmation kind %r", claimed.kind)
            await interaction.response.edit_message(content=UNKNOWN_KIND, view=None)
            return
        await handler(interaction, dict(claimed.payload or {}))


def setup_confirmations(bot: Any) -> None:
    """Route Yes / No presses to :class:`ConfirmButton` (idempotent: every cog may call it)."""
    if not getattr(bot, "_mirage_confirmations", False):
        bot.add_dynamic_items(ConfirmButton)
        bot._mirage_confirmations = True
