"""The ``Web`` and ``❤️`` buttons under a result.

``Web`` opens the job's page in the gallery. A public job gets a plain link button to
``<public_url>/j/<id>``: anyone may open it, as anyone may open the gallery. A stealth job's page
must only open for its owner, and a link button in a channel message is the same URL for
everyone, so a stealth result carries ``mj:web:<id>`` instead: pressed by the owner, it answers
them privately with a signed ``/p/<token>`` link made for them (``bot.signing``); anyone else is
refused without learning anything about the job.

``❤️`` (``mj:fav:<id>``) toggles the presser's favourite (``bot.favourites``), answered
privately; the gallery counts them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import discord
from discord import ui

from bot import quota
from bot.access import account_guild
from bot.buttons import MISSING_JOB, answer_privately, load_source
from bot.dynamic_button import JobIdButton
from bot.favourites import toggle_favourite
from bot.interactions import DATABASE_ERRORS, DATABASE_UNAVAILABLE, actor_from, refuse
from bot.models import Job
from bot.signing import private_job_url
from workers.schema import Visibility

if TYPE_CHECKING:
    from bot.client import MirageBot

log = logging.getLogger(__name__)

WEB_LABEL = "Web"
FAV_EMOJI = "❤️"
ADDED = "Added to your favourites."
REMOVED = "Removed from your favourites."
PRIVATE_LINK = "Your private page for this image (only you can open it, for 7 days):"


def public_job_url(public_url: str, job_id: str) -> str:
    """The gallery page of a public job."""
    return f"{public_url.rstrip('/')}/j/{job_id}"


def web_item(job: Job, public_url: str, row: int) -> ui.Item[Any]:
    """``Web``: a link for a public job, a private-link button for a stealth one."""
    # Discord refuses a whole message over a link it cannot open; a misconfigured PUBLIC_URL
    # must not cost the member their result, so such a job gets the answering button instead.
    if job.visibility == Visibility.PUBLIC.value and public_url.startswith(("http://", "https://")):
        return ui.Button(label=WEB_LABEL, url=public_job_url(public_url, job.id), row=row)
    return WebButton(job.id, row=row)


def link_view(label: str, url: str) -> ui.View | None:
    """A one-button view opening ``url`` (stopped: links need no routing); None for a URL
    Discord would refuse as a link (the answer's text still carries it)."""
    if not url.startswith(("http://", "https://")):
        return None
    view = ui.View(timeout=None)
    view.add_item(ui.Button(label=label, url=url))
    view.stop()
    return view


class WebButton(JobIdButton, prefix="web", label=WEB_LABEL):
    """``Web`` on a stealth result: a private page link for the owner, answered privately."""

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        """Answer the owner (only) with the job's page link."""
        job = await load_source(interaction, self.job_id, private=True)
        if job is None:
            return
        bot: MirageBot = interaction.client  # type: ignore[assignment]
        public_url = bot.settings.public_url
        if job.visibility == Visibility.PUBLIC.value:
            url, text = public_job_url(public_url, job.id), "This image's page:"
        else:
            signer = await bot.link_signer()
            url, text = private_job_url(signer, public_url, interaction.user.id, job.id), PRIVATE_LINK
        await answer_privately(interaction, f"{text} {url}", view=link_view(WEB_LABEL, url))


class FavouriteButton(JobIdButton, prefix="fav", emoji=FAV_EMOJI):
    """``❤️``: add or remove the presser's favourite, answered privately."""

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        """Toggle the favourite and say which way it went."""
        job = await load_source(interaction, self.job_id, private=True)
        if job is None:
            return
        bot: MirageBot = interaction.client  # type: ignore[assignment]
        try:
            async with bot.sessions() as session, session.begin():
                # In a DM: the account the member pays from, as for every other DM command.
                guild_id = await account_guild(session, actor_from(interaction))
                member = await quota.get_or_create_member(session, guild_id, interaction.user.id)
                added = await toggle_favourite(session, member.id, job.id)
        except LookupError:
            await refuse(interaction, MISSING_JOB)  # deleted since the check
            return
        except DATABASE_ERRORS:
            log.exception("could not toggle a favourite of job %s", job.id)
            await refuse(interaction, DATABASE_UNAVAILABLE)
            return
        await answer_privately(interaction, ADDED if added else REMOVED)
