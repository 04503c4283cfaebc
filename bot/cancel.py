"""Cancel (❌) on a job's "Waiting to start…" and progress messages, for the job's owner.

A waiting job (still held by the bot) is simply moved to cancelled; a queued or running one is
also revoked at the broker, which stops it at the worker's next step (``workers.cancellation``
relays the revoke to the process running it). Either way the move and the refund are one
transaction in ``bot.lifecycle``, which refunds exactly once, and the job's message is replaced
by "This job was cancelled" with the refund, as for any failed job. The member's next waiting
job then takes the freed place.

Only the owner may cancel (anyone else is refused privately). A second press, or a press on a
message whose job has meanwhile finished, is answered with what became of the job.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import discord

from bot.buttons import MISSING_JOB, load_job
from bot.dynamic_button import JobIdButton
from bot.interactions import DATABASE_ERRORS, DATABASE_UNAVAILABLE
from bot.models import Job, JobStatus

if TYPE_CHECKING:
    from bot.client import MirageBot

log = logging.getLogger(__name__)

NOT_YOUR_JOB = "Only the member who started this job can cancel it."
ALREADY = {
    JobStatus.DONE: "This job has already finished, so it can no longer be cancelled.",
    JobStatus.FAILED: "This job has already ended (its credits were refunded).",
    JobStatus.CANCELLED: "This job was already cancelled.",
}


def cancelled_text(cost: int) -> str:
    """The private answer to a successful cancel."""
    if not cost:
        return "Cancelled."
    return f"Cancelled. Your {cost} credit{'s were' if cost != 1 else ' was'} refunded."


class CancelButton(JobIdButton, prefix="x", label="Cancel", emoji="❌"):
    """``❌ Cancel`` under a pending job's message."""

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        """Cancel the job if the presser owns it and it has not ended; answer privately."""
        # Revoking talks to the broker: answer "thinking…" (privately) before that can take long.
        await interaction.response.defer(thinking=True, ephemeral=True)
        bot: MirageBot = interaction.client  # type: ignore[assignment]
        try:
            text = await cancel_job(bot, self.job_id, interaction.user.id)
        except DATABASE_ERRORS:
            log.exception("could not cancel job %s", self.job_id)
            text = DATABASE_UNAVAILABLE
        await interaction.followup.send(text, ephemeral=True)


async def cancel_job(bot: MirageBot, job_id: str, user_id: int) -> str:
    """Cancel ``job_id`` for ``user_id`` and return what to tell them."""
    job = await load_job(bot, job_id)
    if job is None:
        return MISSING_JOB
    if job.user_id != user_id:
        return NOT_YOUR_JOB
    if JobStatus(job.status).is_final:
        return ALREADY[JobStatus(job.status)]
    if not await bot.jobs.cancel(job_id):
        # It ended between the lookup and the cancel (finished, failed, or a second press).
        return await _outcome(bot, job)
    log.info("job %s cancelled by its owner (was %s)", job_id, job.status)
    await bot.delivery.notify_final(job_id)
    await bot.jobs.release(job.member_id)
    bot.tracker.wake()
    return cancelled_text(job.cost)


async def _outcome(bot: MirageBot, job: Job) -> str:
    fresh = await load_job(bot, job.id)
    if fresh is None:
        return MISSING_JOB
    return ALREADY.get(JobStatus(fresh.status), ALREADY[JobStatus.CANCELLED])
