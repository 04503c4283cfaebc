"""The job service: accept jobs (one transaction with their charge), keep them fair, dispatch them.

Fairness: a member has at most ``max_running_per_member`` jobs at the broker (queued + running)
and at most ``max_waiting_per_member`` held back here. The broker is FIFO, so a member who fires
off twenty prompts would otherwise fill the queue ahead of everyone else; holding all but a few
in the database and releasing the next one only when one of theirs finishes interleaves members
at the broker. Release runs after a job is created, after each completion, and periodically from
the tracker (which also covers a broker or media store that was down and a bot that restarted).

U# crops never reach the broker (``bot.tracker`` cuts them from the stored grid) and count against
neither cap. Every status change goes through ``bot.lifecycle``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot import global_defaults, job_stats, quota
from bot.access import account_guild, check_actor, check_fits
from bot.banned_words import BannedWordRules, banned_words_message, check_prompt
from bot.content_rules import CHANNEL_NSFW_KEY
from bot.dispatch import Dispatcher
from bot.failure_messages import INPUT_GONE
from bot.inputs import attach_inputs
from bot.lifecycle import ACTIVE, PENDING, Lifecycle, initial_status, release_lock, values_of
from bot.logconfig import job_context
from bot.models import Job, JobStatus, Member, utcnow
from bot.operations import (
    Actor,
    JobRefused,
    NotEnoughCredits,
    Operation,
    TooManyJobs,
    apply_member_aspect,
    credits_message,
    generation_params,
    random_seed,
    resolve_engine,
    resolve_visibility,
)
from bot.pricing import job_price
from bot.profiles import Prompting, profile_queues
from bot.results import Results
from bot.settings import BotSettings
from bot.speed import job_cost, release_order
from bot.storage import MediaNotFound, MediaStoreError
from bot.telemetry import record_metric
from bot.worker_request import build_request
from workers.schema import (
    Engine,
    ErrorCode,
    GenerationParams,
    JobKind,
    JobRequest,
    Visibility,
)

log = logging.getLogger(__name__)

ACTIVE_STATUSES = values_of(ACTIVE)
PENDING_STATUSES = values_of(PENDING)
RELEASE_CONCURRENCY = 4  # releases deciding at once; each holds two pooled connections


@dataclass(slots=True)
class Created:
    """A freshly accepted job and its place in line."""

    job: Job
    position: int
    member: Member


@dataclass(slots=True)
class _Plan:
    params: GenerationParams
    engine: Engine
    visibility: Visibility
    seed: int
    parent: Job | None = None
    parent_index: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class JobService:
    """Creates jobs, enforces the per-member caps and hands jobs to the broker fairly."""

    def __init__(
        self,
        settings: BotSettings,
        sessions: async_sessionmaker[AsyncSession],
        dispatcher: Dispatcher,
        lifecycle: Lifecycle,
        results: Results,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.dispatcher = dispatcher
        self.lifecycle = lifecycle
        self.results = results
        # Checked for every job at accept, so no path (a button, an edited prompt) goes around it.
        self.banned_words = BannedWordRules.from_settings(settings)
        # Styles and profiles apply at dispatch; profile queues go to a dispatcher that routes them.
        self.prompting = Prompting.from_settings(settings)
        if isinstance(routes := getattr(dispatcher, "profile_queues", None), dict):
            routes.update(profile_queues(self.prompting.profiles))
        # One lock per member serialises release decisions in this process, so two completions
        # of the same member cannot both see room for one more job and send two.
        self._member_locks: dict[int, asyncio.Lock] = {}
        self._release_all_lock = asyncio.Lock()
        self._release_slots = asyncio.Semaphore(RELEASE_CONCURRENCY)

    # --- costs -------------------------------------------------------------------------------

    def cost_of(
        self,
        kind: JobKind,
        engine: Engine,
        speed: str | None = None,
        *,
        params: GenerationParams | None = None,
        scale: float | None = None,
    ) -> int:
        """Credits a job costs: the configured base, priced by its work when ``params`` are known."""
        if params is None:
            return job_cost(self.settings, kind, engine, speed)
        return job_price(self.settings, kind, engine, params, scale=scale)

    # --- creation ----------------------------------------------------------------------------

    async def create_imagine(
        self,
        actor: Actor,
        params: GenerationParams,
        *,
        kind: JobKind = JobKind.IMAGINE,
        inputs: Mapping[str, Sequence[str]] | None = None,
    ) -> Created:
        """Accept an ``/imagine``, ``/blend`` or ``/describe`` (``inputs``: stored pictures)."""

        def plan(member: Member, settings: BotSettings) -> _Plan:
            """Engine, visibility, aspect and seed from the prompt, then the member's defaults."""
            resolved = apply_member_aspect(params, member)
            return _Plan(
                params=resolved,
                engine=resolve_engine(resolved, member, settings),
                visibility=resolve_visibility(resolved, member, settings),
                seed=resolved.seed if resolved.seed is not None else random_seed(),
            )

        return await self._create(actor, Operation(kind), plan, inputs)

    async def create_followup(
        self,
        actor: Actor,
        parent: Job,
        operation: Operation,
        *,
        parent_index: int | None = None,
        params: GenerationParams | None = None,
    ) -> Created:
        """Accept a button press on ``parent``: a new job owned and charged to the presser.

        Reroll gets a new random seed; everything else keeps the parent's seed so a variation
        of a seeded grid is reproducible too. ``params`` replaces the parent's parameters where
        the member edited them (Remix, Custom Zoom, Vary (Region)); an edited ``--seed`` or
        ``--model`` wins over the parent's.
        """
        check_fits(parent, operation, parent_index, actor)
        parent_params = params if params is not None else generation_params(parent)
        seed = parent.seed if params is None or params.seed is None else params.seed
        engine = Engine(parent.engine) if params is None or params.engine is None else params.engine

        def plan(member: Member, settings: BotSettings) -> _Plan:
            """The presser's mode applies, also to their older public grids; their own stealth grid
            stays stealth, and so does an edit asking for --stealth (not --public: the form may come
            prefilled from another member's prompt)."""
            visibility = resolve_visibility(None, member, settings)
            own_stealth = parent.user_id == actor.user_id and parent.visibility == Visibility.STEALTH.value
            if own_stealth or (params is not None and params.visibility == Visibility.STEALTH):
                visibility = Visibility.STEALTH
            return _Plan(
                params=parent_params,
                engine=engine,
                visibility=visibility,
                seed=random_seed() if operation.kind == JobKind.REROLL else seed,
                parent=parent,
                parent_index=parent_index,
            )

        return await self._create(actor, operation, plan)

    async def _create(
        self,
        actor: Actor,
        operation: Operation,
        plan_for: Callable[[Member, BotSettings], _Plan],
        inputs: Mapping[str, Sequence[str]] | None = None,
    ) -> Created:
        async with self.sessions() as session, session.begin():
            await check_actor(session, self.settings, actor)
            payer = await account_guild(session, actor)  # a DM job pays from a guild account
            member = await quota.get_or_create_member(session, payer, actor.user_id, actor.display_name)
            # Lock the member row (PostgreSQL; SQLite's BEGIN IMMEDIATE already serialises
            # writers) so two simultaneous commands cannot both pass the cap check below.
            await session.execute(select(Member.id).where(Member.id == member.id).with_for_update())
            settings, defaults = await global_defaults.current(session, self.settings)  # /mirage defaults
            plan = plan_for(member, settings)
            if matched := check_prompt(plan.params.model_prompt, self.banned_words):
                raise JobRefused(banned_words_message(matched))
            if operation.kind != JobKind.CROP:
                await self._check_caps(session, member.id)

            job = Job(
                member_id=member.id,
                user_id=actor.user_id,
                guild_id=actor.guild_id,
                channel_id=actor.channel_id,
                kind=operation.kind.value,
                parent_id=plan.parent.id if plan.parent else None,
                parent_index=plan.parent_index,
                prompt=plan.params.prompt,
                # The channel's age restriction goes in with the job, before any worker can run it.
                params={
                    **plan.params.model_dump(mode="json"),
                    **operation.as_dict(),
                    **({CHANNEL_NSFW_KEY: True} if actor.channel_nsfw else {}),
                },
                seed=plan.seed,
                engine=plan.engine.value,
                visibility=plan.visibility.value,
                status=initial_status(operation.kind).value,
                cost=self.cost_of(operation.kind, plan.engine, params=plan.params, scale=operation.scale),
                application_id=actor.application_id,
                interaction_token=actor.interaction_token,
                reply_message_id=actor.reply_message_id,
                created_at=utcnow(),
            )
            session.add(job)
            await session.flush()
            if inputs:  # in the job's own transaction: no release can send it without them
                attach_inputs(session, job.id, inputs)
            try:
                await quota.reserve(session, member.id, job.id, job.cost, defaults)
            except quota.InsufficientCredits as exc:
                raise NotEnoughCredits(credits_message(exc), exc) from exc
            position = await self._position(session, job) if operation.kind != JobKind.CROP else 0
        record_metric("record_accepted", job.kind, job.engine, job.cost)
        with job_context(job.id, member.id):
            log.info(
                "accepted job %s (%s, %s) for user %s in guild %s, cost %s",
                *(job.id, job.kind, job.engine, actor.user_id, actor.guild_id, job.cost),
            )
        return Created(job=job, position=position, member=member)

    async def _check_caps(self, session: AsyncSession, member_id: int) -> None:
        rows = await session.execute(
            select(Job.status, func.count())
            .where(
                Job.member_id == member_id, Job.status.in_(PENDING_STATUSES), Job.kind != JobKind.CROP.value
            )
            .group_by(Job.status)
        )
        counts = {status: n for status, n in rows.all()}
        active = counts.get(JobStatus.QUEUED.value, 0) + counts.get(JobStatus.RUNNING.value, 0)
        waiting = counts.get(JobStatus.WAITING.value, 0)
        limit_running = self.settings.max_running_per_member
        limit_waiting = self.settings.max_waiting_per_member
        # The new job either goes straight to the broker (a running slot is free) or waits.
        if active + waiting >= limit_running + limit_waiting:
            raise TooManyJobs(
                f"You already have {active} job(s) running and {waiting} waiting, the most allowed "
                f"({limit_running} running, {limit_waiting} waiting). Nothing was charged; try again "
                "when one of them finishes."
            )

    async def _position(self, session: AsyncSession, job: Job) -> int:
        """1-based place among all jobs not yet started, oldest first."""
        count = await session.scalar(
            select(func.count())
            .select_from(Job)
            .where(
                Job.status.in_((JobStatus.WAITING.value, JobStatus.QUEUED.value)),
                Job.created_at <= job.created_at,
                Job.kind != JobKind.CROP.value,
            )
        )
        return max(1, int(count or 1))

    # --- release and dispatch ----------------------------------------------------------------

    def _lock(self, member_id: int) -> asyncio.Lock:
        lock = self._member_locks.get(member_id)
        if lock is None:
            lock = self._member_locks[member_id] = asyncio.Lock()
        return lock

    async def release(self, member_id: int) -> int:
        """Send the member's oldest waiting jobs to the broker while they have a free slot.

        Returns how many were sent. A send that fails leaves the job waiting for the next
        release (the tracker calls ``release_all`` periodically).
        """
        # The in-process lock spares this process's tasks a database round trip; the advisory
        # lock makes the decision safe against other bot processes on the same PostgreSQL. It
        # holds a pooled connection while the body needs another, so only a few releases run at
        # once: a burst of members finishing together must not take the whole pool and wait on it.
        async with self._lock(member_id), self._release_slots, release_lock(self.sessions, member_id):
            async with self.sessions() as session:
                active = await session.scalar(
                    select(func.count())
                    .select_from(Job)
                    .where(Job.member_id == member_id, Job.status.in_(ACTIVE_STATUSES))
                )
                room = self.settings.max_running_per_member - int(active or 0)
                if room <= 0:
                    return 0
                rows = await session.scalars(
                    select(Job).where(Job.member_id == member_id, Job.status == JobStatus.WAITING.value)
                )
                # Turbo, fast, relax, oldest first: the speed is in the params JSON, which SQL
                # cannot order by portably, and a member holds at most max_waiting jobs.
                waiting = release_order(rows.all())[:room]
            sent = 0
            for job in waiting:
                if await self._dispatch(job):
                    sent += 1
            return sent

    async def release_all(self) -> int:
        """Release every member that has waiting jobs (start-up and periodic sweep)."""
        if self._release_all_lock.locked():
            return 0  # a sweep is already running; the next tick will cover anything new
        async with self._release_all_lock:
            async with self.sessions() as session:
                members = (
                    await session.scalars(
                        select(Job.member_id).where(Job.status == JobStatus.WAITING.value).distinct()
                    )
                ).all()
            total = 0
            for member_id in members:
                total += await self.release(member_id)
            return total

    async def build_request(self, job: Job) -> JobRequest:
        """The worker message for a job (``bot.worker_request.build_request``)."""
        return await build_request(
            job, self.sessions, self.results, self.prompting, self.settings.openai_model
        )

    async def _dispatch(self, job: Job) -> bool:
        # The job's log lines (send failures, missing input) carry its id and member.
        with job_context(job.id, job.member_id):
            return await self._dispatch_job(job)

    async def _dispatch_job(self, job: Job) -> bool:
        try:
            request = await self.build_request(job)
        except (MediaNotFound, ValueError) as exc:
            log.warning("job %s cannot start: input image unavailable (%s)", job.id, exc)
            await self.lifecycle.fail(job.id, ErrorCode.BAD_INPUT, INPUT_GONE)
            return False
        except MediaStoreError as exc:  # the store is down, not the image gone: wait, as for the broker
            log.warning("job %s waits: its input image cannot be read now (%s)", job.id, exc)
            return False
        try:
            await self.dispatcher.send(request, Engine(job.engine))
        except Exception:
            log.warning("broker did not take job %s; it stays waiting", job.id, exc_info=True)
            return False
        # A job cancelled meanwhile stays cancelled: the lifecycle only moves waiting jobs.
        await self.lifecycle.queued(job.id)
        return True

    async def cancel(self, job_id: str) -> bool:
        """Cancel a job: revoke it at the broker and refund it; the tracker tells the member."""
        await self.dispatcher.revoke(job_id)
        failed = await self.lifecycle.fail(
            job_id, ErrorCode.CANCELLED, "The job was cancelled.", status=JobStatus.CANCELLED
        )
        return failed is not None

    # --- queries for /info and /status (bot.job_stats) -----------------------------------------

    async def member_counts(self, member_id: int) -> dict[str, int]:
        """The member's jobs per pending status."""
        return await job_stats.member_counts(self.sessions, member_id)

    async def status_counts(self, since: datetime) -> dict[str, Any]:
        """Counts for ``/status``: pending jobs per status and engine, and the last hour's results."""
        return await job_stats.status_counts(self.sessions, since)
