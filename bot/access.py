"""Who may use the bot, and which button actions fit which job: decided from settings and the database.

- Guilds: ``ALLOWED_GUILD_IDS`` lists the guilds the bot serves, and the owners (``OWNER_USER_IDS``)
  approve more with ``/mirage guild approve``. Empty means any guild may use the bot (a warning at
  start when the application is public). A banned guild is refused whatever the lists say.
- Direct messages: refused unless ``ALLOW_DMS``; then a DM job is charged to the member's
  account in the guild of their most recent guild job (:func:`account_guild`), so DM and guild
  jobs draw on the same credits. A member who never used the bot in a guild is charged to a
  DM-only account (guild 0). The DM job itself keeps guild 0, so it is delivered to the DM.
- Members: an owner can ban a member (in one guild, or everywhere with guild 0). A ban in the
  guild that pays for a member's DM jobs refuses those too.
- Credits power: ``/quota`` needs Manage Server in an *approved* guild (listed or approved by an
  owner, even when any guild may generate), or ``ADMIN_USER_IDS`` / ``OWNER_USER_IDS``; inviting
  the bot to one's own server gives no power over credits.
- Buttons: an action must fit its parent (U#/V#/🔄 on a grid, vary/upscale/zoom/pan on a single
  image) and come from the parent's guild; a forged custom_id for anything else is refused.

Every refusal is a :class:`~bot.operations.JobRefused`: answered privately, nothing charged.
"""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from bot.models import Guild, Job, Member
from bot.operations import SINGLE_IMAGE_KINDS, Actor, JobRefused, Operation
from bot.settings import BotSettings
from workers.schema import JobKind

log = logging.getLogger(__name__)

DM_GUILD = 0
GUILD_NOT_APPROVED = (
    "Mirage isn't enabled on this server yet. Ask the bot's owner to approve it; nothing was charged."
)
GUILD_BANNED = "Mirage is not available on this server."
MEMBER_BANNED = "You can't use Mirage."
DMS_REFUSED = "Mirage works in servers, not in direct messages. Use /imagine in a server channel."
DOES_NOT_FIT = "That button doesn't belong to this image."

# Actions a grid offers (the U#, V# and 🔄 rows) and those a single image offers (views.py).
GRID_ACTIONS = frozenset({JobKind.CROP, JobKind.VARIATION, JobKind.REROLL})
SINGLE_ACTIONS = frozenset(
    {JobKind.VARIATION, JobKind.REGION, JobKind.UPSCALE, JobKind.ZOOM, JobKind.PAN, JobKind.SQUARE}
)


class AccessRefused(JobRefused):
    """The member, guild or channel may not start jobs."""


def listed(settings: BotSettings, guild_id: int) -> bool:
    """Whether the settings list this guild (an empty list lists nobody)."""
    return guild_id in settings.allowed_guild_ids


def is_owner(settings: BotSettings, user_id: int) -> bool:
    """Whether the user is one of the bot's owners."""
    return user_id in settings.owner_user_ids


async def guild_row(session: AsyncSession, guild_id: int) -> Guild | None:
    """The stored guild, if it was ever seen."""
    return await session.get(Guild, guild_id)


async def guild_approved(session: AsyncSession, settings: BotSettings, guild_id: int) -> bool:
    """Listed in ``ALLOWED_GUILD_IDS`` or approved by an owner, and not banned."""
    row = await guild_row(session, guild_id)
    if row is not None and row.banned:
        return False
    return listed(settings, guild_id) or (row is not None and row.approved)


async def guild_may_generate(session: AsyncSession, settings: BotSettings, guild_id: int) -> bool:
    """Whether members of this guild may start jobs (any guild when nothing is listed)."""
    row = await guild_row(session, guild_id)
    if row is not None and row.banned:
        return False
    if not settings.allowed_guild_ids:
        return True
    return listed(settings, guild_id) or (row is not None and row.approved)


async def check_actor(session: AsyncSession, settings: BotSettings, actor: Actor) -> None:
    """Refuse a job from a DM (unless allowed), an unapproved or banned guild, or a banned member.

    A member is banned here, everywhere (guild 0), or, for a DM, in the guild that pays for it.
    """
    if actor.guild_id == DM_GUILD:
        if not settings.allow_dms:
            raise AccessRefused(DMS_REFUSED)
    elif not await guild_may_generate(session, settings, actor.guild_id):
        row = await guild_row(session, actor.guild_id)
        raise AccessRefused(GUILD_BANNED if row is not None and row.banned else GUILD_NOT_APPROVED)
    # A DM job pays from the account of the member's last guild: a ban there holds in DMs too,
    # or a member banned in one guild could keep spending that guild's credits from a DM.
    payer = await account_guild(session, actor)
    banned = await session.scalar(
        select(Member.id).where(
            Member.user_id == actor.user_id,
            Member.guild_id.in_((actor.guild_id, payer, DM_GUILD)),
            Member.banned.is_(True),
        )
    )
    if banned is not None:
        log.info("refused a job from banned user %s", actor.user_id)
        raise AccessRefused(MEMBER_BANNED)


async def account_guild(session: AsyncSession, actor: Actor) -> int:
    """The guild whose member account pays for ``actor``'s job (see the module docstring)."""
    if actor.guild_id != DM_GUILD:
        return actor.guild_id
    latest = await session.scalar(
        select(Job.guild_id)
        .where(Job.user_id == actor.user_id, Job.guild_id != DM_GUILD)
        .order_by(Job.created_at.desc())
        .limit(1)
    )
    return DM_GUILD if latest is None else int(latest)


def check_fits(parent: Job, operation: Operation, parent_index: int | None, actor: Actor) -> None:
    """Refuse a button action its parent's message never offered (a forged custom_id)."""
    kind = operation.kind
    single = JobKind(parent.kind) in SINGLE_IMAGE_KINDS
    if parent.guild_id != actor.guild_id:
        raise JobRefused(DOES_NOT_FIT)
    if single:
        fits = kind in SINGLE_ACTIONS and parent_index is None
        fits = fits and not (kind == JobKind.UPSCALE and parent.kind == JobKind.UPSCALE.value)
    else:
        needs_index = kind in (JobKind.CROP, JobKind.VARIATION)
        fits = kind in GRID_ACTIONS and (parent_index is not None) == needs_index
    if not fits:
        log.info("refused %s on a %s job from user %s", kind.value, parent.kind, actor.user_id)
        raise JobRefused(DOES_NOT_FIT)
