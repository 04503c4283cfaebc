"""Vary (Region): the button that hands out the editor link, and the job the editor's submit makes.

Who may use it: the gallery's editor opens only for the job's owner (the token names a user and
the gallery checks the job is theirs), and a link button in a channel message would show the
same URL to everyone. So the result carries a plain button, ``mj:region:<id>``: pressed by the
owner, it answers them privately with a fresh editor link signed for *them* (30 minutes);
anyone else is refused. Nobody else ever sees a token.

The editor's submit calls :func:`region_job_callback`'s function (registered as the gallery's
``REGION_JOB_KEY`` in ``bot.__main__``): it accepts a REGION job through the same path as every
other job (charge, caps, fair release), with the mask's media key and the edited prompt on the
job, so ``JobService.build_request`` sends the mask to the worker. A refusal (credits, caps, a
prompt that does not parse) is raised as ``RegionRefused`` with the member's message. The result
is posted in the channel of the image it repaints, mentioning the member, like any other job
whose interaction token is gone.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import discord

from bot.buttons import answer_privately, load_job, load_source
from bot.dynamic_button import JobIdButton
from bot.interactions import DATABASE_ERRORS, DATABASE_UNAVAILABLE
from bot.links import link_view
from bot.models import JobStatus
from bot.operations import Actor, JobRefused, Operation, generation_params
from bot.prompt import parse_prompt
from bot.prompt_errors import PromptError
from bot.signing import region_editor_url
from workers.schema import JobKind

if TYPE_CHECKING:
    from bot.client import MirageBot
    from bot.web.common import RegionJobCallback

log = logging.getLogger(__name__)

REGION_LABEL = "Vary (Region)"
EDITOR_LINK = (
    "Mark the part to repaint and edit the prompt in the editor (this link is for you only and "
    "works for 30 minutes):"
)
IMAGE_GONE = "That image is no longer available."
ACCEPTED = "Your edit was accepted. The result will be posted in the channel, mentioning you."


class RegionButton(JobIdButton, prefix="region", label=REGION_LABEL, emoji="🖌️"):
    """``Vary (Region)``: a private editor link for the image's owner."""

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        """Answer the owner privately with an editor link signed for them."""
        job = await load_source(interaction, self.job_id, owner_only=True, private=True)
        if job is None:
            return
        bot: MirageBot = interaction.client  # type: ignore[assignment]
        signer = await bot.link_signer()
        # A single image is image 0 of its job (the editor repaints what the member sees).
        url = region_editor_url(signer, bot.settings.public_url, interaction.user.id, job.id, 0)
        await answer_privately(interaction, f"{EDITOR_LINK} {url}", view=link_view("Open the editor", url))


def region_job_callback(bot: MirageBot) -> RegionJobCallback:
    """The gallery's Vary (Region) callback, accepting jobs for ``bot``."""
    # Imported here: the buttons load with the Discord client, the gallery only where it runs.
    from bot.web.common import RegionRefused

    async def create_region_job(user_id: int, job_id: str, index: int, prompt: str, mask_key: str) -> str:
        parent = await load_job(bot, job_id)
        if parent is None or parent.user_id != user_id or parent.status != JobStatus.DONE.value:
            raise RegionRefused(IMAGE_GONE)
        try:
            edited = parse_prompt(prompt)
        except PromptError as exc:
            raise RegionRefused(str(exc)) from None
        # The repaint keeps the image's shape and every setting; only the words change.
        params = generation_params(parent).model_copy(
            update={"prompt": edited.prompt, "negative_prompt": edited.negative_prompt}
        )
        actor = Actor(
            guild_id=parent.guild_id, channel_id=parent.channel_id, user_id=user_id, display_name=""
        )
        operation = Operation(JobKind.REGION, mask_key=mask_key)
        try:
            created = await bot.flow.submit(
                actor,
                lambda who: bot.jobs.create_followup(
                    who, parent, operation, parent_index=index or None, params=params
                ),
            )
        except JobRefused as exc:
            raise RegionRefused(str(exc)) from None
        except DATABASE_ERRORS:
            log.exception("could not accept a Vary (Region) job")
            raise RegionRefused(DATABASE_UNAVAILABLE) from None
        log.info("Vary (Region) job %s accepted from the editor", created.job.id)
        return ACCEPTED

    return create_region_job
