"""``/prefer``: a member's prompt suffix, custom ``--options`` and the Remix switch.

Every value is checked when it is set (it must be parameters that parse), so a saved preference
never breaks a later prompt; a mistake is answered privately with what is allowed.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands
from sqlalchemy import delete, func, select, update

from bot import quota
from bot.access import account_guild
from bot.interactions import actor_from
from bot.models import Member, MemberOption, utcnow
from bot.prompt_prefs import MAX_OPTIONS, check_option_name, check_parameters

if TYPE_CHECKING:
    from bot.client import MirageBot

log = logging.getLogger(__name__)

MESSAGE_LIMIT = 2000  # Discord's characters per message


def pages(lines: list[str], limit: int = MESSAGE_LIMIT) -> list[str]:
    """``lines`` joined into as few messages as fit ``limit`` each (a longer line is cut)."""
    out: list[str] = []
    for line in lines:
        line = line if len(line) <= limit else line[: limit - 1] + "…"
        if out and len(out[-1]) + 1 + len(line) <= limit:
            out[-1] += "\n" + line
        else:
            out.append(line)
    return out


def remix_text(on: bool) -> str:
    """What the member is told after switching Remix."""
    if on:
        return (
            "Remix mode is **on**: V1–V4, Vary, 🔄, Zoom and the pans first open an editor with the "
            "prompt and parameters."
        )
    return "Remix mode is **off**: buttons start their job at once."


class Prefer(commands.GroupCog, group_name="prefer", group_description="Your prompt preferences"):
    """``/prefer suffix``, ``/prefer option …``, ``/prefer remix``."""

    option = app_commands.Group(name="option", description="Your own --name shortcuts for parameters")

    def __init__(self, bot: MirageBot) -> None:
        self.bot = bot
        super().__init__()

    async def _member(self, interaction: discord.Interaction) -> Member:
        actor = actor_from(interaction)
        async with self.bot.sessions() as session, session.begin():
            guild_id = await account_guild(session, actor)  # in a DM: the account DM jobs use
            return await quota.get_or_create_member(session, guild_id, actor.user_id, actor.display_name)

    async def _update(self, member: Member, **values: object) -> None:
        async with self.bot.sessions() as session, session.begin():
            await session.execute(update(Member).where(Member.id == member.id).values(**values))

    @app_commands.command(name="suffix", description="Parameters added to the end of every prompt")
    @app_commands.describe(value="Parameters such as --ar 3:2 --stylize 250; leave empty to clear")
    async def suffix(self, interaction: discord.Interaction, value: str | None = None) -> None:
        """Set or clear the suffix; it must be parameters that parse."""
        text = (value or "").strip()
        if text:
            problem = check_parameters(text, self.bot.jobs.prompting.presets)
            if problem:
                await interaction.response.send_message(
                    f"Your suffix was not saved. {problem}", ephemeral=True
                )
                return
        await self._update(await self._member(interaction), prompt_suffix=text or None)
        said = f"Every prompt now ends with `{text}`." if text else "Your suffix is cleared."
        await interaction.response.send_message(said, ephemeral=True)

    @app_commands.command(
        name="remix", description="Switch Remix mode: edit the prompt when you press a button"
    )
    async def remix(self, interaction: discord.Interaction) -> None:
        """Toggle Remix mode."""
        member = await self._member(interaction)
        on = not member.remix
        await self._update(member, remix=on)
        await interaction.response.send_message(remix_text(on), ephemeral=True)

    @option.command(name="set", description="Make --name stand for these parameters")
    @app_commands.describe(
        name="The option's name, used as --name", value="Parameters, e.g. --ar 3:2 --chaos 20"
    )
    async def option_set(self, interaction: discord.Interaction, name: str, value: str) -> None:
        """Create or replace a custom option."""
        key = name.strip().lower().removeprefix("--")
        problem = check_option_name(name.strip()) or check_parameters(value, self.bot.jobs.prompting.presets)
        if problem:
            await interaction.response.send_message(
                f"`--{key[:32]}` was not saved. {problem}", ephemeral=True
            )
            return
        member = await self._member(interaction)
        async with self.bot.sessions() as session, session.begin():
            existing = await session.scalar(
                select(MemberOption).where(MemberOption.member_id == member.id, MemberOption.name == key)
            )
            if existing is not None:
                existing.value = value.strip()
            else:
                count = await session.scalar(
                    select(func.count()).select_from(MemberOption).where(MemberOption.member_id == member.id)
                )
                if int(count or 0) >= MAX_OPTIONS:
                    await interaction.response.send_message(
                        f"You have {MAX_OPTIONS} options, the most allowed; delete one first "
                        "with `/prefer option delete`.",
                        ephemeral=True,
                    )
                    return
                session.add(
                    MemberOption(member_id=member.id, name=key, value=value.strip(), created_at=utcnow())
                )
        await interaction.response.send_message(f"`--{key}` now means `{value.strip()}`.", ephemeral=True)

    @option.command(name="list", description="Your custom options")
    async def option_list(self, interaction: discord.Interaction) -> None:
        """List the member's options and suffix."""
        member = await self._member(interaction)
        async with self.bot.sessions() as session:
            rows = (
                await session.scalars(
                    select(MemberOption)
                    .where(MemberOption.member_id == member.id)
                    .order_by(MemberOption.name)
                )
            ).all()
        lines = [f"`--{row.name}` = `{row.value}`" for row in rows] or ["You have no custom options yet."]
        if member.prompt_suffix:
            lines.append(f"Suffix: `{member.prompt_suffix}`")
        # 25 options of up to 500 characters are far more than one message holds: Discord would
        # refuse the answer and the member would see only "The application did not respond".
        first, *rest = pages(lines)
        await interaction.response.send_message(first, ephemeral=True)
        for page in rest:
            await interaction.followup.send(page, ephemeral=True)

    @option.command(name="delete", description="Delete one of your custom options")
    @app_commands.describe(name="The option's name")
    async def option_delete(self, interaction: discord.Interaction, name: str) -> None:
        """Delete an option by name."""
        key = name.strip().lower().removeprefix("--")
        member = await self._member(interaction)
        async with self.bot.sessions() as session, session.begin():
            result = await session.execute(
                delete(MemberOption).where(MemberOption.member_id == member.id, MemberOption.name == key)
            )
        if not getattr(result, "rowcount", 0):
            await interaction.response.send_message(
                f"You have no option `--{key[:32]}`; `/prefer option list` shows yours.", ephemeral=True
            )
            return
        await interaction.response.send_message(f"`--{key}` is deleted.", ephemeral=True)


async def setup(bot: MirageBot) -> None:
    """Extension entry point."""
    await bot.add_cog(Prefer(bot))
