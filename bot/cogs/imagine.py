"""``/imagine``: the member's preferences, the parser, images and banned words, then ``JobFlow``.

A prompt that makes several jobs (permutations, ``--repeat``) or costs ``PRICE_CONFIRM_AT``
credits or more in total is asked about first (``bot.confirm``); nothing is charged until Yes.
Every refusal before that (a prompt mistake, a banned word, an image that cannot be used) is
private and free.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from bot import confirm
from bot.banned_words import BannedWordRules, banned_words_message, check_prompts
from bot.imagefetch import FetchLimits, ImageInputError
from bot.inputs import InputKeys, fetch_inputs, keys_payload, store_inputs
from bot.interactions import DATABASE_ERRORS, DATABASE_UNAVAILABLE, actor_from, refuse
from bot.pricing import needs_confirmation
from bot.prompt import IW_WITHOUT_IMAGE, PromptError, PromptPlan, plan_prompts
from bot.prompt_prefs import Prefs, apply_prefs, prompting_context
from bot.settings import BotSettings
from workers.schema import GenerationParams

if TYPE_CHECKING:
    from bot.client import MirageBot
    from bot.models import Member

log = logging.getLogger(__name__)

CONFIRM_KIND = "imagine"
PREFS_BUDGET_S = 1.5  # of Discord's 3 s to answer the command


def notes_text(notes: Sequence[str]) -> str:
    """The parser's and profiles' notes as one private message."""
    return "\n".join(f"-# {note}" for note in notes)


def question(count: int, cost: int, notes: Sequence[str]) -> str:
    """ "This makes N jobs and costs C credits" with the notes under it."""
    jobs = f"{count} job{'s' if count != 1 else ''}"
    credits = f"{cost} credit{'s' if cost != 1 else ''}"
    lines = [f"This makes {jobs} and costs {credits}. Start {'them' if count != 1 else 'it'}?"]
    if notes:
        lines.append(notes_text(notes))
    return "\n".join(lines)


class Imagine(commands.Cog):
    """The one command members use most."""

    def __init__(self, bot: MirageBot) -> None:
        self.bot = bot
        self.banned = BannedWordRules.from_settings(bot.settings)
        self.limits = FetchLimits.from_settings(bot.settings)
        self.allow_addresses: tuple[str, ...] = ()  # tests allow their local image server

    @app_commands.command(name="imagine", description="Create four images from a prompt")
    @app_commands.describe(
        prompt="What to imagine; parameters go at the end: --ar 3:2 --seed 7 --no text",
        image="An image to start from (optional)",
    )
    async def imagine(
        self,
        interaction: discord.Interaction,
        prompt: app_commands.Range[str, 1, 4000],
        image: discord.Attachment | None = None,
    ) -> None:
        """Plan the prompt; a mistake is answered privately and costs nothing."""
        bot = self.bot
        lookup = asyncio.ensure_future(self._prefs(interaction))
        # A refusal reads best as a private reply with no public "thinking…" first, so the
        # preferences are read before answering, but never at the cost of Discord's 3 s: when
        # the database is slow (a burst of commands), defer now and answer privately later.
        done, _ = await asyncio.wait({lookup}, timeout=PREFS_BUDGET_S)
        deferred_publicly = not done
        if deferred_publicly:
            await interaction.response.defer(thinking=True)
        try:
            member, prefs, settings = await lookup
        except DATABASE_ERRORS:
            log.warning("could not read the preferences of %s", interaction.user.id, exc_info=True)
            await refuse(interaction, DATABASE_UNAVAILABLE)
            return
        prompting = bot.jobs.prompting
        try:
            plan = plan_prompts(apply_prefs(prompt, prefs), styles=prompting.presets)
        except PromptError as exc:
            await refuse(interaction, str(exc))
            return
        banned = check_prompts((params.model_prompt for params in plan.params), self.banned)
        if banned:
            await refuse(interaction, banned_words_message(banned))
            return
        notes = [note for note in plan.notes if not (image is not None and note == IW_WITHOUT_IMAGE)]
        for params in plan.params:
            notes += [note for note in prompting.notes(params) if note not in notes]
        cost = bot.flow.imagine_cost(plan.params, member, settings)
        ask = plan.needs_confirmation or needs_confirmation(cost, bot.settings.price_confirm_at)
        # Fetching images can take seconds: answer Discord first (privately when asking).
        if not interaction.response.is_done():
            await interaction.response.defer(thinking=True, ephemeral=ask)
        elif ask:
            # The public "thinking…" would carry the question: replace it with a private one.
            with contextlib.suppress(discord.HTTPException):
                await interaction.delete_original_response()
        inputs = await self._inputs(interaction, plan, image)
        if inputs is None:
            return
        if ask:
            payload = {
                "params": [p.model_dump(mode="json") for p in plan.params],
                "inputs": keys_payload(inputs),
            }
            await confirm.ask(
                interaction,
                bot.sessions,
                kind=CONFIRM_KIND,
                payload=payload,
                question=question(plan.count, cost, notes),
                expires_in_s=bot.settings.confirm_expiry_s,
            )
            return
        created = await bot.flow.imagine(interaction, plan.params[0], inputs)
        if created is not None and notes:
            await interaction.followup.send(notes_text(notes), ephemeral=True)

    async def _prefs(self, interaction: discord.Interaction) -> tuple[Member | None, Prefs, BotSettings]:
        """The member, their prompt preferences, and the settings with the global defaults applied."""
        async with self.bot.sessions() as session:
            return await prompting_context(session, actor_from(interaction), self.bot.settings)

    async def _inputs(
        self, interaction: discord.Interaction, plan: PromptPlan, image: discord.Attachment | None
    ) -> InputKeys | None:
        """Fetch and store the prompt's pictures; None (after telling the member) if one fails.

        Permutations may differ in their links; each distinct prompt's pictures are fetched
        once and all of them are the batch's inputs.
        """
        keys: InputKeys = {}
        seen: set[str] = set()
        try:
            for params in plan.params:
                marker = _reference_marker(params)
                if marker in seen:
                    continue
                seen.add(marker)
                attachment = image if len(seen) == 1 else None  # the attachment belongs to the batch
                found = await fetch_inputs(params, attachment, self.limits, self.allow_addresses)
                for role, role_keys in (await store_inputs(self.bot.store, found)).items():
                    keys.setdefault(role, []).extend(role_keys)
        except ImageInputError as exc:
            await refuse(interaction, f"{exc} Nothing was charged.")
            return None
        return keys


def _reference_marker(params: GenerationParams) -> str:
    return repr((params.image_prompts, params.style_refs, params.character_refs, params.omni_ref))


async def _confirmed(interaction: discord.Interaction[Any], payload: dict[str, Any]) -> None:
    """Yes: start each job through the normal accept path."""
    bot: MirageBot = interaction.client  # type: ignore[assignment]
    batch = [GenerationParams.model_validate(item) for item in payload.get("params") or []]
    inputs = {role: list(keys) for role, keys in (payload.get("inputs") or {}).items()}
    await bot.flow.imagine_many(interaction, batch, inputs)


confirm.on_confirm(CONFIRM_KIND, _confirmed)


async def setup(bot: MirageBot) -> None:
    """Extension entry point."""
    confirm.setup_confirmations(bot)
    await bot.add_cog(Imagine(bot))
