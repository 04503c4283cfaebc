"""Admin commands: ``/quota`` (show, set, grant, reset, default) and ``/status``.

Every command here carries ``@admin_only()`` (``bot.checks``), which decides on each use, and
Manage Server as its ``default_member_permissions``, so Discord hides them from other members.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import TYPE_CHECKING, Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot import global_defaults, quota, quota_admin
from bot.checks import Refused, admin_only
from bot.models import JobStatus, utcnow
from bot.settings import Period
from bot.telemetry import record_metric

if TYPE_CHECKING:
    from bot.client import MirageBot

log = logging.getLogger(__name__)

PeriodName = Literal["day", "week", "month"]
PING_TIMEOUT_S = 1.0
# Must stay within quota_admin.MAX_CREDITS (PostgreSQL stores credits as 32-bit integers).
MAX_OPTION = 1_000_000


def describe(report: quota.CreditReport) -> str:
    """One line for a credit report."""
    stamp = int(report.resets_at.timestamp())
    return (
        f"{report.remaining} credits left: {report.used} of {report.limit} used this {report.period.value}, "
        f"{report.bonus} bonus; resets <t:{stamp}:R>"
    )


class Admin(commands.Cog):
    """Credits administration and the health of the queue."""

    # Manage Server by default, so members do not even see these commands; server owners can
    # still grant them to other roles in Server Settings → Integrations.
    quota_group = app_commands.Group(
        name="quota",
        description="Manage members' credits (admins)",
        guild_only=True,
        default_permissions=discord.Permissions(manage_guild=True),
    )

    def __init__(self, bot: MirageBot) -> None:
        self.bot = bot

    async def _member_id(self, interaction: discord.Interaction, user: discord.abc.User) -> int:
        # Bots never start jobs: an account for one would only hide an admin's slip ("Granted 5
        # to @Mirage") behind a success message.
        if user.bot:
            raise Refused(f"{user.mention} is a bot: bots have no credits. Nothing changed.")
        async with self.bot.sessions() as session, session.begin():
            member = await quota.get_or_create_member(
                session, interaction.guild_id or 0, user.id, getattr(user, "display_name", "") or user.name
            )
            return member.id

    async def _report(self, member_id: int) -> quota.CreditReport:
        async with self.bot.sessions() as session:
            _settings, defaults = await global_defaults.current(session, self.bot.settings)
            return await quota.report(session, member_id, defaults)

    @quota_group.command(name="show", description="Show a member's credits")
    @admin_only()
    @app_commands.describe(user="The member")
    async def quota_show(self, interaction: discord.Interaction, user: discord.User) -> None:
        """A member's allowance, usage, bonus and reset time."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        report = await self._report(await self._member_id(interaction, user))
        await interaction.followup.send(f"{user.mention}: {describe(report)}", ephemeral=True)

    @quota_group.command(name="set", description="Set a member's credit limit per period")
    @admin_only()
    @app_commands.describe(user="The member", limit="Credits per period", period="How often the limit resets")
    async def quota_set(
        self,
        interaction: discord.Interaction,
        user: discord.User,
        limit: app_commands.Range[int, 0, MAX_OPTION],
        period: PeriodName | None = None,
    ) -> None:
        """Give the member their own allowance (kept until changed)."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        member_id = await self._member_id(interaction, user)
        async with self.bot.sessions() as session, session.begin():
            await quota_admin.set_member_limit(session, member_id, limit, Period(period) if period else None)
        report = await self._report(member_id)
        log.info("admin %s set the limit of user %s to %s/%s", interaction.user.id, user.id, limit, period)
        await interaction.followup.send(f"Updated {user.mention}: {describe(report)}", ephemeral=True)

    @quota_group.command(name="grant", description="Grant a member extra credits (negative takes back)")
    @admin_only()
    @app_commands.describe(user="The member", amount="Credits to add", note="Why (kept in the ledger)")
    async def quota_grant(
        self,
        interaction: discord.Interaction,
        user: discord.User,
        amount: app_commands.Range[int, -MAX_OPTION, MAX_OPTION],
        note: app_commands.Range[str, 0, 200] = "",
    ) -> None:
        """Bonus credits survive period resets until spent."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        member_id = await self._member_id(interaction, user)
        try:
            async with self.bot.sessions() as session, session.begin():
                await quota_admin.grant(session, member_id, amount, interaction.user.id, note)
        except ValueError as exc:
            await interaction.followup.send(f"Nothing changed: {exc}.", ephemeral=True)
            return
        report = await self._report(member_id)
        log.info("admin %s granted %s credits to user %s", interaction.user.id, amount, user.id)
        await interaction.followup.send(
            f"Granted {amount} to {user.mention}: {describe(report)}", ephemeral=True
        )

    @quota_group.command(name="reset", description="Reset a member's usage in the current period")
    @admin_only()
    @app_commands.describe(user="The member")
    async def quota_reset(self, interaction: discord.Interaction, user: discord.User) -> None:
        """Usage back to zero; bonus credits untouched."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        member_id = await self._member_id(interaction, user)
        async with self.bot.sessions() as session, session.begin():
            _settings, defaults = await global_defaults.current(session, self.bot.settings)
            cleared = await quota_admin.reset_usage(session, member_id, interaction.user.id, defaults)
        report = await self._report(member_id)
        await interaction.followup.send(
            f"Cleared {cleared} used credits for {user.mention}: {describe(report)}", ephemeral=True
        )

    @quota_group.command(name="default", description="Set this server's default credit limit")
    @admin_only()
    @app_commands.describe(
        limit="Credits per period for members without their own limit", period="Reset period"
    )
    async def quota_default(
        self,
        interaction: discord.Interaction,
        limit: app_commands.Range[int, 0, MAX_OPTION],
        period: PeriodName | None = None,
    ) -> None:
        """The server-wide allowance."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        async with self.bot.sessions() as session, session.begin():
            await quota_admin.set_guild_default(
                session, interaction.guild_id or 0, limit, Period(period) if period else None
            )
            # Without a period the one below the guild applies: the owners' global default, if set.
            _settings, defaults = await global_defaults.current(session, self.bot.settings)
        shown = period or defaults.period.value
        await interaction.followup.send(f"Server default set to {limit} credits per {shown}.", ephemeral=True)

    @app_commands.command(name="status", description="Queue depth, workers online and recent jobs (admins)")
    @app_commands.default_permissions(manage_guild=True)
    @admin_only()
    async def status(self, interaction: discord.Interaction) -> None:
        """A snapshot of the compute side and the last hour."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        workers = await self.bot.dispatcher.worker_status(ping_timeout=PING_TIMEOUT_S)
        record_metric("set_workers_online", len(workers.workers))
        for queue, depth in workers.queue_depths.items():
            record_metric("set_queue_depth", queue, depth)
        counts = await self.bot.jobs.status_counts(utcnow() - timedelta(hours=1))
        lines = ["**Mirage status**"]
        queues = self.bot.dispatcher_queues()
        for engine, queue in queues.items():
            depth = workers.queue_depths.get(queue)
            pending = counts["pending"]
            waiting = pending.get((engine, JobStatus.WAITING.value), 0)
            queued = pending.get((engine, JobStatus.QUEUED.value), 0)
            running = pending.get((engine, JobStatus.RUNNING.value), 0)
            broker = "?" if depth is None else str(depth)
            lines.append(
                f"Queue `{queue}` ({engine}): {broker} in broker · {queued} queued, {running} running, "
                f"{waiting} held for fairness"
            )
        online = ", ".join(workers.workers) if workers.workers else "none answered"
        lines.append(f"Workers online: **{len(workers.workers)}** ({online})")
        recent = counts["recent"]
        total = sum(recent.values())
        failed = recent.get(JobStatus.FAILED.value, 0) + recent.get(JobStatus.CANCELLED.value, 0)
        lines.append(f"Last hour: {total} jobs, {recent.get(JobStatus.DONE.value, 0)} done, {failed} failed")
        await interaction.followup.send("\n".join(lines), ephemeral=True)


async def setup(bot: MirageBot) -> None:
    """Extension entry point."""
    await bot.add_cog(Admin(bot))
