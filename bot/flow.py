"""Accepting a job from an interaction: the one path /imagine and every button share.

Defer at once (Discord's 3-second deadline holds even when the database is busy), create the
job with its charge, then show it waiting, release it to the broker and wake the tracker, or
for a U# crop, finish it right away. A refusal (caps, credits, an unreachable database) is
answered privately and nothing is charged.

Several jobs from one confirmed ``/imagine`` (permutations, ``--repeat``) go through the same
path one by one, each charged and kept fair like any other; the first one that is refused stops
the rest. Only the first can use the interaction's message; the others are delivered to the
channel with a mention when they finish.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import discord

from bot import confirm
from bot.buttons import mark_pressed_at, pressed_button
from bot.interactions import DATABASE_ERRORS, DATABASE_UNAVAILABLE, actor_from, refuse
from bot.jobs import Created, JobService
from bot.models import Job, Member
from bot.operations import Actor, JobRefused, Operation, generation_params, resolve_engine
from bot.pricing import needs_confirmation
from bot.settings import BotSettings
from bot.tracker import Tracker
from workers.schema import Direction, Engine, GenerationParams, JobKind

log = logging.getLogger(__name__)

PRESS_CONFIRM_KIND = "press"


class JobFlow:
    """Turns interactions into accepted jobs and sets them going."""

    def __init__(self, jobs: JobService, tracker: Tracker) -> None:
        self.jobs = jobs
        self.tracker = tracker

    async def imagine(
        self,
        interaction: discord.Interaction[Any],
        params: GenerationParams,
        inputs: Mapping[str, Sequence[str]] | None = None,
    ) -> Created | None:
        """Accept an ``/imagine`` with its parsed parameters (and stored input images)."""
        return await self.accept(
            interaction, lambda actor: self.jobs.create_imagine(actor, params, inputs=inputs)
        )

    def imagine_cost(
        self, batch: Sequence[GenerationParams], member: Member | None, settings: BotSettings
    ) -> int:
        """Credits a batch of ``/imagine`` jobs costs, each on the engine it would run on.

        ``settings``: with the owners' global defaults, which decide a member's default engine.
        """
        return sum(
            self.jobs.cost_of(JobKind.IMAGINE, resolve_engine(params, member, settings), params=params)
            for params in batch
        )

    async def imagine_many(
        self,
        interaction: discord.Interaction[Any],
        batch: Sequence[GenerationParams],
        inputs: Mapping[str, Sequence[str]] | None = None,
    ) -> list[Created]:
        """Accept each job of a confirmed batch in order; stop at the first refusal.

        Returns the jobs started. A refusal after the first job is told privately, naming how
        many were started and that the rest were not (and not charged).
        """
        started: list[Created] = []
        for index, params in enumerate(batch):
            actor = actor_from(interaction)
            reply = await self._batch_reply(interaction, index, len(batch)) if index else None
            if index:
                # The original response is the first job's: each later one edits a follow-up of
                # its own (waiting, progress, result), or, without one, posts to the channel.
                actor = (
                    dataclasses.replace(actor, reply_message_id=reply.id)
                    if reply is not None
                    else dataclasses.replace(actor, application_id=None, interaction_token=None)
                )

            def create(_actor: Actor, actor: Actor = actor, params: GenerationParams = params) -> Any:
                return self.jobs.create_imagine(actor, params, inputs=inputs)

            problem = await self.start(interaction, create, first=not index)
            if isinstance(problem, str):
                if reply is not None:
                    with contextlib.suppress(discord.HTTPException):
                        await reply.delete()
                if index:
                    await interaction.followup.send(
                        f"Started {index} of {len(batch)} jobs; the other {len(batch) - index} were not "
                        f"started and nothing was charged for them. {problem}",
                        ephemeral=True,
                    )
                return started
            if problem is not None:
                started.append(problem)
        return started

    async def _batch_reply(
        self, interaction: discord.Interaction[Any], index: int, count: int
    ) -> discord.WebhookMessage | None:
        """A public follow-up for job ``index`` of a batch to show itself in, or None."""
        try:
            return await interaction.followup.send(f"Job {index + 1} of {count}: starting…", wait=True)
        except discord.HTTPException as exc:
            log.info("no follow-up for job %d of a batch (%s); it posts to the channel", index + 1, exc)
            return None

    async def press(
        self,
        interaction: discord.Interaction[Any],
        parent: Job,
        operation: Operation,
        parent_index: int | None = None,
        *,
        params: GenerationParams | None = None,
        confirmed: bool = False,
    ) -> Created | None:
        """Accept a button press on ``parent``'s message (``params``: the member's edited ones).

        A press costing ``PRICE_CONFIRM_AT`` credits or more asks Yes / No first (like
        ``/imagine``) and returns None; Yes comes back here with ``confirmed`` and is accepted.
        """
        if not confirmed:
            settings = self.jobs.settings
            cost = self.jobs.cost_of(
                operation.kind,
                Engine(parent.engine),
                params=params if params is not None else generation_params(parent),
                scale=operation.scale,
            )
            if needs_confirmation(cost, settings.price_confirm_at):
                payload = {
                    "job_id": parent.id,
                    "kind": operation.kind.value,
                    "operation": operation.as_dict(),
                    "parent_index": parent_index,
                    "params": params.model_dump(mode="json") if params is not None else None,
                    # Yes arrives on the private question: it marks the button on the result then.
                    "pressed": pressed_button(interaction),
                }
                await confirm.ask(
                    interaction,
                    self.jobs.sessions,
                    kind=PRESS_CONFIRM_KIND,
                    payload=payload,
                    question=f"This costs {cost} credits. Go ahead?",
                    expires_in_s=settings.confirm_expiry_s,
                )
                return None
        return await self.accept(
            interaction,
            lambda actor: self.jobs.create_followup(
                actor, parent, operation, parent_index=parent_index, params=params
            ),
        )

    async def submit(self, actor: Actor, create: Callable[[Actor], Awaitable[Created]]) -> Created:
        """Accept a job asked for outside Discord (the web editor) and set it going.

        Refusals propagate as ``JobRefused`` for the caller to word; with no interaction to
        answer, the member first hears of the job when its result is posted in the channel.
        """
        created = await create(actor)
        await self.jobs.release(created.job.member_id)
        self.tracker.wake()
        return created

    async def accept(
        self,
        interaction: discord.Interaction[Any],
        create: Callable[[Actor], Awaitable[Created]],
    ) -> Created | None:
        """Defer, create the job, then start it; returns None when it was refused."""
        result = await self.start(interaction, create, first=True)
        return result if isinstance(result, Created) else None

    async def start(
        self,
        interaction: discord.Interaction[Any],
        create: Callable[[Actor], Awaitable[Created]],
        *,
        first: bool = True,
    ) -> Created | str | None:
        """Create and start one job: the job, or the refusal's text (already told if ``first``)."""
        if not interaction.response.is_done():
            await interaction.response.defer(thinking=True)
        try:
            created = await create(actor_from(interaction))
        except JobRefused as exc:
            if first:
                await refuse(interaction, str(exc))
            return str(exc)
        except DATABASE_ERRORS:
            # The job and its charge are one transaction, so nothing was created or charged; say
            # so rather than leaving the deferred "thinking…" message hanging forever.
            log.exception("could not accept a job: database unavailable")
            if first:
                await refuse(interaction, DATABASE_UNAVAILABLE)
            return DATABASE_UNAVAILABLE
        job = created.job
        delivery = self.tracker.delivery
        delivery.remember_limit(job.id, interaction.filesize_limit)
        if job.kind == JobKind.CROP.value:
            await self.tracker.run_crop(job.id)
            return created
        await delivery.show_waiting(job, created.position)
        await self.jobs.release(job.member_id)
        self.tracker.wake()
        return created


async def _press_confirmed(interaction: discord.Interaction[Any], payload: dict[str, Any]) -> None:
    """Yes to an expensive press: the same follow-up job through the normal accept path."""
    bot: Any = interaction.client
    async with bot.sessions() as session:
        parent = await session.get(Job, payload["job_id"])
    if parent is None:
        await refuse(interaction, "This job no longer exists; nothing was charged.")
        return
    knobs = payload.get("operation") or {}
    direction = knobs.get("direction")
    operation = Operation(
        JobKind(payload["kind"]),
        strength=knobs.get("strength"),
        scale=knobs.get("scale"),
        direction=Direction(direction) if direction else None,
        mask_key=knobs.get("mask_key"),
    )
    raw = payload.get("params")
    params = GenerationParams.model_validate(raw) if raw is not None else None
    created = await bot.flow.press(
        interaction, parent, operation, payload.get("parent_index"), params=params, confirmed=True
    )
    if created is not None:
        await mark_pressed_at(bot, payload.get("pressed"))


confirm.on_confirm(PRESS_CONFIRM_KIND, _press_confirmed)
