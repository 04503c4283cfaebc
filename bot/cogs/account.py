"""A member's own account: ``/info``, ``/settings``, ``/stealth``, ``/public``, ``/gallery``."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands, ui
from discord.ext import commands
from sqlalchemy import select, update

from bot import global_defaults, quota
from bot.access import account_guild
from bot.interactions import actor_from
from bot.models import Job, JobStatus, Member
from bot.operations import resolve_engine, resolve_visibility
from bot.settings import BotSettings
from workers.schema import Engine, GenerationParams, Visibility

if TYPE_CHECKING:
    from bot.client import MirageBot

log = logging.getLogger(__name__)

ASPECTS = ("1:1", "3:2", "2:3", "4:3", "3:4", "16:9", "9:16", "21:9")
ENGINE_LABELS = {Engine.SDXL: "Stable Diffusion XL", Engine.OPENAI: "OpenAI images"}
GALLERY_JOBS = 10


async def ensure_member(bot: MirageBot, interaction: discord.Interaction[Any]) -> Member:
    """The member row for the interaction's user, created on first contact.

    In a DM it is the account DM jobs are charged to (``bot.access.account_guild``).
    """
    actor = actor_from(interaction)
    async with bot.sessions() as session, session.begin():
        guild_id = await account_guild(session, actor)
        return await quota.get_or_create_member(session, guild_id, actor.user_id, actor.display_name)


async def update_member(bot: MirageBot, member_id: int, **values: Any) -> Member:
    """Change a member's settings and return the updated row."""
    async with bot.sessions() as session, session.begin():
        await session.execute(update(Member).where(Member.id == member_id).values(**values))
        member = await session.get(Member, member_id, populate_existing=True)
        assert member is not None
        return member


async def effective_settings(bot: MirageBot) -> BotSettings:
    """The bot's settings with the owners' ``/mirage defaults`` applied, as jobs resolve them."""
    async with bot.sessions() as session:
        settings, _defaults = await global_defaults.current(session, bot.settings)
    return settings


def settings_summary(settings: BotSettings, member: Member) -> str:
    """The text above the /settings controls (``settings``: with the global defaults applied)."""
    engine = resolve_engine(GenerationParams(prompt="-"), member, settings)
    visibility = resolve_visibility(None, member, settings)
    return (
        "**Your Mirage settings**\n"
        f"Default engine: **{ENGINE_LABELS[engine]}**\n"
        f"Visibility: **{visibility.value}**"
        + (" (your images stay out of the public gallery)" if visibility == Visibility.STEALTH else "")
        + f"\nDefault aspect ratio: **{member.default_aspect or '1:1'}**"
        + f"\nRemix mode: **{'on' if member.remix else 'off'}**"
        + (" (buttons open the prompt editor first)" if member.remix else "")
    )


class SettingsView(ui.View):
    """Selects for the member's defaults. Only the member who opened it can use it."""

    def __init__(self, bot: MirageBot, member: Member, settings: BotSettings) -> None:
        super().__init__(timeout=600)
        self.bot = bot
        self.member = member
        # The global defaults decide what a member without their own default gets: show those.
        engine = resolve_engine(GenerationParams(prompt="-"), member, settings)
        visibility = resolve_visibility(None, member, settings)
        self.engine_select.options = [
            discord.SelectOption(label=ENGINE_LABELS[e], value=e.value, default=e == engine) for e in Engine
        ]
        self.visibility_select.options = [
            discord.SelectOption(
                label="Public",
                value="public",
                description="Shown in the gallery",
                default=visibility == Visibility.PUBLIC,
            ),
            discord.SelectOption(
                label="Stealth",
                value="stealth",
                description="Never in public listings",
                default=visibility == Visibility.STEALTH,
            ),
        ]
        current = member.default_aspect or "1:1"
        self.aspect_select.options = [
            discord.SelectOption(label=aspect, value=aspect, default=aspect == current) for aspect in ASPECTS
        ]
        # The switch shows its state: green when Remix is on.
        self.remix_button.label = f"Remix: {'on' if member.remix else 'off'}"
        on = discord.ButtonStyle.success
        self.remix_button.style = on if member.remix else discord.ButtonStyle.secondary

    async def interaction_check(self, interaction: discord.Interaction[Any], /) -> bool:
        """Settings belong to whoever opened them."""
        if interaction.user.id != self.member.user_id:
            await interaction.response.send_message("These are someone else's settings.", ephemeral=True)
            return False
        return True

    async def _save(self, interaction: discord.Interaction[Any], **values: Any) -> None:
        self.member = await update_member(self.bot, self.member.id, **values)
        settings = await effective_settings(self.bot)
        fresh = SettingsView(self.bot, self.member, settings)
        await interaction.response.edit_message(content=settings_summary(settings, self.member), view=fresh)
        self.stop()

    @ui.select(placeholder="Default engine", row=0)
    async def engine_select(self, interaction: discord.Interaction[Any], select: ui.Select[Any]) -> None:
        """Pick the default engine."""
        await self._save(interaction, default_engine=Engine(select.values[0]).value)

    @ui.select(placeholder="Visibility", row=1)
    async def visibility_select(self, interaction: discord.Interaction[Any], select: ui.Select[Any]) -> None:
        """Pick public or stealth."""
        await self._save(interaction, visibility=Visibility(select.values[0]).value)

    @ui.select(placeholder="Default aspect ratio", row=2)
    async def aspect_select(self, interaction: discord.Interaction[Any], select: ui.Select[Any]) -> None:
        """Pick the aspect ratio used when a prompt has no --ar."""
        value = select.values[0]
        if value not in ASPECTS:
            value = "1:1"
        await self._save(interaction, default_aspect=None if value == "1:1" else value)

    @ui.button(label="Remix", row=3)
    async def remix_button(self, interaction: discord.Interaction[Any], button: ui.Button[Any]) -> None:
        """Switch Remix mode (as ``/prefer remix`` does)."""
        await self._save(interaction, remix=not self.member.remix)


class Account(commands.Cog):
    """Commands about the member's own account."""

    def __init__(self, bot: MirageBot) -> None:
        self.bot = bot

    @app_commands.command(name="info", description="Your credits, jobs and settings")
    async def info(self, interaction: discord.Interaction) -> None:
        """Credits left and reset time, running and queued jobs, visibility, default engine."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        member = await ensure_member(self.bot, interaction)
        async with self.bot.sessions() as session:
            settings, defaults = await global_defaults.current(session, self.bot.settings)
            credits = await quota.report(session, member.id, defaults)
        counts = await self.bot.jobs.member_counts(member.id)
        engine = resolve_engine(GenerationParams(prompt="-"), member, settings)
        visibility = resolve_visibility(None, member, settings)
        stamp = int(credits.resets_at.timestamp())
        bonus = f" + {credits.bonus} bonus" if credits.bonus else ""
        text = (
            "**Your Mirage account**\n"
            f"Credits: **{credits.remaining}** left ({credits.used} of {credits.limit} used this "
            f"{credits.period.value}{bonus}), resets <t:{stamp}:R>\n"
            f"Jobs: {counts.get(JobStatus.RUNNING.value, 0)} running, "
            f"{counts.get(JobStatus.QUEUED.value, 0)} queued, "
            f"{counts.get(JobStatus.WAITING.value, 0)} waiting\n"
            f"Visibility: **{visibility.value}**\n"
            f"Default engine: **{ENGINE_LABELS[engine]}**\n"
            f"Default aspect ratio: **{member.default_aspect or '1:1'}**"
        )
        await interaction.followup.send(text, ephemeral=True)

    @app_commands.command(
        name="settings", description="Choose your default engine, visibility and aspect ratio"
    )
    async def settings_command(self, interaction: discord.Interaction) -> None:
        """An ephemeral panel of selects."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        member = await ensure_member(self.bot, interaction)
        settings = await effective_settings(self.bot)
        await interaction.followup.send(
            settings_summary(settings, member), view=SettingsView(self.bot, member, settings), ephemeral=True
        )

    @app_commands.command(name="stealth", description="Keep your new images out of the public gallery")
    async def stealth(self, interaction: discord.Interaction) -> None:
        """Set the default visibility to stealth."""
        await self._set_visibility(interaction, Visibility.STEALTH)

    @app_commands.command(name="public", description="Show your new images in the public gallery")
    async def public(self, interaction: discord.Interaction) -> None:
        """Set the default visibility to public."""
        await self._set_visibility(interaction, Visibility.PUBLIC)

    async def _set_visibility(self, interaction: discord.Interaction, visibility: Visibility) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        member = await ensure_member(self.bot, interaction)
        await update_member(self.bot, member.id, visibility=visibility.value)
        if visibility == Visibility.STEALTH:
            text = "Stealth mode is on: your new images will not appear in any public gallery."
        else:
            text = "Public mode is on: your new images will appear in the public gallery."
        await interaction.followup.send(text, ephemeral=True)

    @app_commands.command(name="gallery", description="A link to your gallery and your latest images")
    async def gallery(self, interaction: discord.Interaction) -> None:
        """The member's gallery page and latest jobs (stealth ones too: only they see this)."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        member = await ensure_member(self.bot, interaction)
        async with self.bot.sessions() as session:
            jobs = (
                await session.scalars(
                    select(Job)
                    .where(Job.member_id == member.id, Job.status == JobStatus.DONE.value)
                    .order_by(Job.created_at.desc())
                    .limit(GALLERY_JOBS)
                )
            ).all()
        base = self.bot.settings.public_url.rstrip("/")
        lines = [f"**Your gallery:** {base}/m/{member.public_id}"]
        if not jobs:
            lines.append("No images yet: try `/imagine`.")
        for job in jobs:
            prompt = discord.utils.escape_markdown((job.prompt or "")[:60])
            stamp = int(job.created_at.timestamp())
            if job.visibility == Visibility.PUBLIC.value:
                where = f"{base}/j/{job.id}"
            elif job.message_id and job.guild_id:
                where = (
                    f"https://discord.com/channels/{job.guild_id}/{job.channel_id}/{job.message_id} (stealth)"
                )
            else:
                where = "(stealth)"
            shown = f" **{prompt}**" if prompt else ""  # /describe and /blend have no prompt
            lines.append(f"• {job.kind}{shown} <t:{stamp}:R> {where}")
        await interaction.followup.send("\n".join(lines), ephemeral=True)


async def setup(bot: MirageBot) -> None:
    """Extension entry point."""
    await bot.add_cog(Account(bot))
