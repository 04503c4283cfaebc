"""Remix mode: with ``/prefer remix`` on, a button first opens an editor for the prompt.

V1–V4, Vary (Subtle/Strong), 🔄, Zoom Out and the pans open a modal whose one text field holds
the job's prompt with its parameters (as ``/imagine`` would take it). On submit the text is
parsed like any prompt; a mistake or a banned word is answered privately in the modal's
response and nothing is charged; otherwise the button's job starts with the edited prompt on
the original image. U#, Upscale and Make Square never open it (they do not use a prompt).

The editor's ``custom_id`` is ``remix:<the button's custom_id>``, and a submit is handled from
that id and the field alone (``bot.buttons.remix_submitted``), not by the modal object: a bot
restarted while the editor was open still starts the job. The member's Remix setting and prompt
preferences are those of the account they pay from, in a DM too (``bot.access``).

``bot.buttons`` calls :func:`maybe_open` from its press handler; this module does not import
the button table, so the two stay free of cycles.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import discord
from discord import ui
from sqlalchemy import select

from bot.access import account_guild
from bot.banned_words import BannedWordRules, banned_words_message, check_prompt
from bot.interactions import actor_from, refuse
from bot.models import Job, Member
from bot.operations import Operation, generation_params
from bot.prompt import PromptError, parse_prompt, prompt_text
from bot.prompt_prefs import expand_options, load_prefs
from workers.schema import GenerationParams

if TYPE_CHECKING:
    from bot.client import MirageBot

log = logging.getLogger(__name__)

REMIX_CODES = frozenset({"v", "vary", "r", "zoom", "pan"})
MODAL_PREFIX = "remix:"
FIELD_ID = "prompt"
MAX_FIELD = 4000


def remix_source(parent: Job) -> str:
    """The text the editor starts with: the parent's prompt and parameters, without its seed."""
    params = generation_params(parent)
    return prompt_text(params)[:MAX_FIELD]


def remixed_parent(parent: Job, params: GenerationParams) -> Job:
    """A detached copy of ``parent`` carrying the edited prompt, for the normal follow-up path.

    The copy keeps the parent's id (the new job's input image is still the parent's) and is
    never added to a session. An edited ``--seed`` or ``--model`` wins over the parent's.
    """
    return Job(
        id=parent.id,
        member_id=parent.member_id,
        user_id=parent.user_id,
        guild_id=parent.guild_id,
        channel_id=parent.channel_id,
        kind=parent.kind,
        prompt=params.prompt,
        params=params.model_dump(mode="json"),
        seed=params.seed if params.seed is not None else parent.seed,
        engine=(params.engine.value if params.engine is not None else parent.engine),
        visibility=parent.visibility,
        status=parent.status,
        cost=parent.cost,
    )


async def remix_on(bot: MirageBot, interaction: discord.Interaction[Any]) -> bool:
    """Whether the presser has Remix mode on (in a DM: on the account they pay from)."""
    async with bot.sessions() as session:
        guild_id = await account_guild(session, actor_from(interaction))
        query = select(Member.remix).where(Member.guild_id == guild_id, Member.user_id == interaction.user.id)
        return bool(await session.scalar(query))


class RemixModal(ui.Modal):
    """The editor: one paragraph field prefilled with the prompt and its parameters.

    It only shows the form: the submit is handled from its ``custom_id`` (:func:`submit`).
    """

    def __init__(self, parent: Job, *, custom_id: str, title: str) -> None:
        super().__init__(title=title[:45], custom_id=custom_id, timeout=900)
        self.prompt: ui.TextInput[RemixModal] = ui.TextInput(
            label="Prompt and parameters",
            style=discord.TextStyle.paragraph,
            default=remix_source(parent),
            custom_id=FIELD_ID,
            max_length=MAX_FIELD,
        )
        self.add_item(self.prompt)


def submitted_text(interaction: discord.Interaction[Any], field_id: str = FIELD_ID) -> str | None:
    """A form's field as submitted (rows of inputs, or labels holding one), or None."""
    pending: list[Any] = [interaction.data or {}]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            if node.get("custom_id") == field_id and isinstance(node.get("value"), str):
                return str(node["value"])
            pending.extend(node.get("components") or [])
            if isinstance(node.get("component"), dict):
                pending.append(node["component"])
    return None


async def submit(
    interaction: discord.Interaction[Any],
    parent: Job,
    operation: Operation,
    index: int | None,
    text: str,
) -> bool:
    """Parse the edit like any prompt; refuse privately, or start the button's job: True if started."""
    bot: MirageBot = interaction.client  # type: ignore[assignment]
    async with bot.sessions() as session:
        guild_id = await account_guild(session, actor_from(interaction))
        _member, prefs = await load_prefs(session, guild_id, interaction.user.id)
    try:
        params = parse_prompt(expand_options(text, prefs.options), styles=bot.jobs.prompting.presets)
    except PromptError as exc:
        # refuse(): a slow lookup of the parent may have deferred the submit already.
        await refuse(interaction, f"{exc}\nNothing was charged; press the button again to edit.")
        return False
    banned = check_prompt(params.model_prompt, BannedWordRules.from_settings(bot.settings))
    if banned:
        await refuse(interaction, banned_words_message(banned))
        return False
    # ``params`` too: an edit costly enough to ask first is rebuilt on Yes from the stored parent
    # and these, so without them Yes would start the unedited prompt.
    created = await bot.flow.press(
        interaction, remixed_parent(parent, params), operation, index, params=params
    )
    return created is not None


async def maybe_open(interaction: discord.Interaction[Any], parent: Job, code: str, *, label: str) -> bool:
    """Open the Remix editor instead of starting the job, if the presser wants it.

    Returns True when the modal was opened (the press is answered). A press that had to be
    deferred already (a slow database) cannot open a modal and runs as usual.
    """
    if code not in REMIX_CODES or interaction.response.is_done():
        return False
    bot: MirageBot = interaction.client  # type: ignore[assignment]
    if not await remix_on(bot, interaction):
        return False
    button_id = str((interaction.data or {}).get("custom_id") or code)
    modal = RemixModal(parent, custom_id=f"{MODAL_PREFIX}{button_id}"[:100], title=f"Remix: {label}")
    await interaction.response.send_modal(modal)
    return True
