"""The owners' global ``/mirage`` command: approve and ban guilds, ban members, set global defaults.

``/mirage defaults`` stores the allowance, period, engine and visibility that apply below every
guild's and member's own settings and above the bot's settings (``bot.global_defaults``).

Only ``OWNER_USER_IDS`` may run it (checked on every use, wherever it is typed). Joining a guild
that is neither listed in ``ALLOWED_GUILD_IDS`` nor approved leaves it again when
``LEAVE_UNAPPROVED_GUILDS`` is set; otherwise its members are refused at ``/imagine`` (bot.access).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands
from sqlalchemy import update

from bot import global_defaults, quota
from bot.access import guild_may_generate, is_owner
from bot.checks import Refused
from bot.models import Guild, Member, utcnow
from bot.quota_sql import GUILDS, dialect_insert

if TYPE_CHECKING:
    from bot.client import MirageBot

log = logging.getLogger(__name__)

NOT_OWNER = "Only the bot's owners can use this command."
MAX_SNOWFLAKE = 2**63 - 1  # Discord ids are 64-bit; the database stores them as BIGINT
# /mirage defaults credit_limit: as /quota allows (GlobalDefaults.credit_limit is a 32-bit integer).
MAX_CREDIT_LIMIT = 1_000_000
PUBLIC_WARNING = (
    "ALLOWED_GUILD_IDS is empty and the application is public: anyone who invites the bot can "
    "generate images on their server (credits admin still needs an owner's approval)"
)


def parse_guild_id(text: str) -> int:
    """A server id typed as text (options carry ids as strings: they exceed JSON's safe integers).

    Raises :class:`~bot.checks.Refused` with an answer naming the problem for anything else, so a
    typo is explained instead of failing the command (or overflowing the database column).
    """
    value = text.strip()
    if value.isascii() and value.isdigit() and 0 < int(value) <= MAX_SNOWFLAKE:
        return int(value)
    raise Refused(
        f"guild_id must be a server's numeric id (like 123456789012345678: right-click the server, "
        f"Copy Server ID), not {text!r}. Nothing changed."
    )


def owner_only() -> Any:
    """Decorate an app command so only ``OWNER_USER_IDS`` may run it."""

    async def predicate(interaction: discord.Interaction[Any]) -> bool:
        if is_owner(interaction.client.settings, interaction.user.id):  # type: ignore[attr-defined]
            return True
        log.info("user %s was refused an owner command", interaction.user.id)
        raise Refused(NOT_OWNER)

    return app_commands.check(predicate)


async def set_guild(bot: MirageBot, guild_id: int, **values: bool) -> None:
    """Create the guild row if needed and set its access flags."""
    async with bot.sessions() as session, session.begin():
        await session.execute(
            dialect_insert(session, GUILDS)
            .values(id=guild_id, name="", created_at=utcnow())
            .on_conflict_do_nothing(index_elements=["id"])
        )
        await session.execute(update(Guild).where(Guild.id == guild_id).values(**values))


class Owner(commands.Cog):
    """``/mirage``: the owners' controls over who may use the bot."""

    mirage = app_commands.Group(name="mirage", description="Bot owner controls")
    guild_group = app_commands.Group(name="guild", description="Approve or ban servers", parent=mirage)
    member_group = app_commands.Group(name="member", description="Ban or unban members", parent=mirage)

    def __init__(self, bot: MirageBot) -> None:
        self.bot = bot

    async def _answer(self, interaction: discord.Interaction, text: str) -> None:
        log.info("owner %s: %s", interaction.user.id, text)
        await interaction.response.send_message(text, ephemeral=True)

    @guild_group.command(name="approve", description="Let a server use the bot and its admins manage credits")
    @owner_only()
    @app_commands.describe(guild_id="The server's id")
    async def guild_approve(self, interaction: discord.Interaction, guild_id: str) -> None:
        """Approve a guild (and lift a ban)."""
        server = parse_guild_id(guild_id)
        await set_guild(self.bot, server, approved=True, banned=False)
        await self._answer(interaction, f"Server {server} approved.")

    @guild_group.command(name="revoke", description="Withdraw a server's approval")
    @owner_only()
    @app_commands.describe(guild_id="The server's id")
    async def guild_revoke(self, interaction: discord.Interaction, guild_id: str) -> None:
        """Withdraw an approval (a listed guild stays allowed by the settings)."""
        server = parse_guild_id(guild_id)
        await set_guild(self.bot, server, approved=False)
        await self._answer(interaction, f"Server {server} is no longer approved.")

    @guild_group.command(name="ban", description="Refuse a server everything, whatever the settings list")
    @owner_only()
    @app_commands.describe(guild_id="The server's id", leave="Also leave the server")
    async def guild_ban(self, interaction: discord.Interaction, guild_id: str, leave: bool = False) -> None:
        """Ban a guild; optionally leave it."""
        server = parse_guild_id(guild_id)
        await set_guild(self.bot, server, banned=True, approved=False)
        guild = self.bot.get_guild(server)
        if leave and guild is not None:
            await guild.leave()
        await self._answer(interaction, f"Server {server} banned{' and left' if leave else ''}.")

    @guild_group.command(name="unban", description="Lift a server's ban")
    @owner_only()
    @app_commands.describe(guild_id="The server's id")
    async def guild_unban(self, interaction: discord.Interaction, guild_id: str) -> None:
        """Lift a guild ban."""
        server = parse_guild_id(guild_id)
        await set_guild(self.bot, server, banned=False)
        await self._answer(interaction, f"Server {server} unbanned.")

    async def _ban_member(self, user: discord.abc.User, guild_id: str | None, banned: bool) -> str:
        where = parse_guild_id(guild_id) if guild_id else 0
        async with self.bot.sessions() as session, session.begin():
            member = await quota.get_or_create_member(session, where, user.id)
            await session.execute(update(Member).where(Member.id == member.id).values(banned=banned))
        scope = f"on server {where}" if where else "everywhere"
        return f"{user.mention} {'banned' if banned else 'unbanned'} {scope}."

    @member_group.command(name="ban", description="Refuse a member jobs on one server or everywhere")
    @owner_only()
    @app_commands.describe(user="The member", guild_id="The server's id (empty: everywhere)")
    async def member_ban(
        self, interaction: discord.Interaction, user: discord.User, guild_id: str | None = None
    ) -> None:
        """Ban a member."""
        await self._answer(interaction, await self._ban_member(user, guild_id, True))

    @member_group.command(name="unban", description="Lift a member's ban")
    @owner_only()
    @app_commands.describe(user="The member", guild_id="The server's id (empty: everywhere)")
    async def member_unban(
        self, interaction: discord.Interaction, user: discord.User, guild_id: str | None = None
    ) -> None:
        """Lift a member ban."""
        await self._answer(interaction, await self._ban_member(user, guild_id, False))

    @mirage.command(name="defaults", description="Show or set the defaults below every server's own")
    @owner_only()
    @app_commands.describe(
        credit_limit="Credits per period (-1: back to the settings)",
        period="How often the allowance renews",
        engine="Default engine",
        visibility="Default visibility",
        reset="Clear every global default (the settings apply again)",
    )
    @app_commands.choices(
        period=[app_commands.Choice(name=p, value=p) for p in ("day", "week", "month")],
        engine=[app_commands.Choice(name=e, value=e) for e in ("sdxl", "openai")],
        visibility=[app_commands.Choice(name=v, value=v) for v in ("public", "stealth")],
    )
    async def defaults(
        self,
        interaction: discord.Interaction,
        credit_limit: app_commands.Range[int, -1, MAX_CREDIT_LIMIT] | None = None,
        period: str | None = None,
        engine: str | None = None,
        visibility: str | None = None,
        reset: bool = False,
    ) -> None:
        """Set the given global defaults (none given: show them)."""
        values: dict[str, Any] = dict.fromkeys(global_defaults.FIELDS) if reset else {}
        if credit_limit is not None:
            values["credit_limit"] = None if credit_limit < 0 else credit_limit
        named = {"credit_period": period, "default_engine": engine, "default_visibility": visibility}
        values.update({name: value for name, value in named.items() if value is not None})
        async with self.bot.sessions() as session, session.begin():
            if values:
                row = await global_defaults.store(session, **values)
            else:
                row = await global_defaults.load(session)
            text = global_defaults.describe(self.bot.settings, row)
        await self._answer(interaction, text)

    @commands.Cog.listener()
    async def on_guild_join(self, guild: discord.Guild) -> None:
        """Leave a guild nobody approved, when the settings say so."""
        settings = self.bot.settings
        async with self.bot.sessions() as session:
            allowed = await guild_may_generate(session, settings, guild.id)
        if allowed:
            return
        if settings.leave_unapproved_guilds:
            log.warning("joined unapproved guild %s; leaving it", guild.id)
            await guild.leave()
        else:
            log.warning("joined unapproved guild %s; refused until an owner approves it", guild.id)

    @commands.Cog.listener()
    async def on_ready(self) -> None:
        """Warn once when anyone can invite the bot and use it."""
        if self.bot.settings.allowed_guild_ids:
            return
        try:
            info = await self.bot.application_info()
        except discord.HTTPException:
            return
        if info.bot_public:
            log.warning(PUBLIC_WARNING)


async def setup(bot: MirageBot) -> None:
    """Extension entry point."""
    await bot.add_cog(Owner(bot))
