"""The job service: accept jobs (one transaction with their charge), keep them fair, dispatch them.

Life of a job (``bot.models.JobStatus``)::

    waiting ──release──▶ queued ──worker picks it──▶ running ──▶ done | failed | cancelled
       ▲ created here       (sent to the broker)       (tracker in bot.delivery sees PROGRESS)

Fairness: a member has at most ``max_running_per_member`` jobs at the broker (queued + running)
and at most ``max_waiting_per_member`` held back here. The broker is FIFO, so a member who fires
off twenty prompts would otherwise fill the queue ahead of everyone else; holding all but a few
in the database and releasing the next one only when one of theirs finishes interleaves members
at the broker. Release runs after a job is created, after each completion, and periodically from
the tracker (which also covers a broker that was down and a bot that restarted).

U# crops never reach the broker: they are a crop of a stored grid and are finished inline by
``bot.delivery``; they count against neither cap.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot import quota
from bot.dispatch import Dispatcher
from bot.logconfig import job_context
from bot.models import Image, Job, JobStatus, Member, utcnow
from bot.settings import BotSettings
from bot.storage import MediaNotFound, MediaStore
from workers.schema import (
    GRID_SIZE,
    MAX_SEED,
    Direction,
    Engine,
    ErrorCode,
    GenerationParams,
    JobKind,
    JobRequest,
    Visibility,
    nearest_bucket,
)

log = logging.getLogger(__name__)

try:  # Prometheus metrics are optional: the bot works the same without them.
    from bot import metrics as _metrics
except ImportError:  # pragma: no cover - prometheus_client not installed
    _metrics = None  # type: ignore[assignment]

ACTIVE_STATUSES = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)
PENDING_STATUSES = (JobStatus.WAITING.value, JobStatus.QUEUED.value, JobStatus.RUNNING.value)
# Kinds whose result is a single image rather than a 2x2 grid.
SINGLE_IMAGE_KINDS = frozenset({JobKind.UPSCALE, JobKind.CROP})
# Operation details are stored next to the generation parameters in Job.params (the gallery lists
# them: "Strength 0.85"); GenerationParams ignores these keys when the row is read back.
OP_KEYS = ("strength", "scale", "direction")


class JobRefused(Exception):
    """A job the bot will not accept. ``str()`` is the member-facing, ephemeral explanation."""


class TooManyJobs(JobRefused):
    """The member already has the maximum number of jobs running and waiting."""


class NotEnoughCredits(JobRefused):
    """The member cannot afford the job."""

    def __init__(self, message: str, error: quota.InsufficientCredits) -> None:
        super().__init__(message)
        self.error = error


@dataclass(frozen=True, slots=True)
class Actor:
    """Who asked for a job and where: the interaction's facts the job row keeps for delivery."""

    guild_id: int  # 0 for DMs
    channel_id: int
    user_id: int
    display_name: str
    application_id: int | None = None
    interaction_token: str | None = None
    is_admin: bool = False


@dataclass(frozen=True, slots=True)
class Operation:
    """What a job does beyond its prompt: the kind and the knobs a button sets."""

    kind: JobKind
    strength: float | None = None
    scale: float | None = None
    direction: Direction | None = None

    def as_dict(self) -> dict[str, Any]:
        """The operation's knobs as JSON for ``Job.params`` (so a restart can rebuild the request)."""
        values = {
            "strength": self.strength,
            "scale": self.scale,
            "direction": self.direction.value if self.direction else None,
        }
        return {key: value for key, value in values.items() if value is not None}

    @classmethod
    def from_job(cls, job: Job) -> Operation:
        """The operation stored on a job row."""
        raw = job.params or {}
        direction = raw.get("direction")
        return cls(
            kind=JobKind(job.kind),
            strength=raw.get("strength"),
            scale=raw.get("scale"),
            direction=Direction(direction) if direction else None,
        )


@dataclass(slots=True)
class Created:
    """A freshly accepted job and its place in line."""

    job: Job
    position: int
    member: Member


@dataclass(frozen=True, slots=True)
class Failed:
    """A job this process just finalised as failed: what metrics and messages need."""

    job_id: str
    kind: str
    engine: str
    code: ErrorCode
    refunded: int  # credits given back by this failure (0 if nothing was reserved)


@dataclass(slots=True)
class _Plan:
    params: GenerationParams
    engine: Engine
    visibility: Visibility
    seed: int
    parent: Job | None = None
    parent_index: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def record_metric(name: str, *args: Any) -> None:
    """Call ``bot.metrics.<name>(*args)`` if metrics are available; never let metrics break a job."""
    if _metrics is None:
        return
    try:
        getattr(_metrics, name)(*args)
    except Exception:
        log.debug("metric %s failed", name, exc_info=True)


def random_seed() -> int:
    """A fresh seed leaving room for the grid's seed..seed+3."""
    return secrets.randbelow(MAX_SEED - GRID_SIZE + 2)


def grid_count(kind: JobKind) -> int:
    """How many images a job of this kind produces."""
    return 1 if kind in SINGLE_IMAGE_KINDS else GRID_SIZE


def resolve_engine(params: GenerationParams, member: Member | None, settings: BotSettings) -> Engine:
    """``--model`` wins, then the member's default, then the server's configured default."""
    if params.engine is not None:
        return Engine(params.engine)
    if member is not None and member.default_engine:
        try:
            return Engine(member.default_engine)
        except ValueError:
            pass
    return Engine(settings.default_engine)


def resolve_visibility(
    params: GenerationParams | None, member: Member | None, settings: BotSettings
) -> Visibility:
    """``--stealth``/``--public`` wins, then the member's mode, then the configured default."""
    if params is not None and params.visibility is not None:
        return Visibility(params.visibility)
    if member is not None and member.visibility:
        try:
            return Visibility(member.visibility)
        except ValueError:
            pass
    return Visibility(settings.default_visibility)


def apply_member_aspect(params: GenerationParams, member: Member) -> GenerationParams:
    """Use the member's default aspect ratio when the prompt did not say ``--ar``."""
    if "aspect" in params.model_fields_set or not member.default_aspect:
        return params
    try:
        w_text, h_text = member.default_aspect.split(":")
        aspect = (int(w_text), int(h_text))
        width, height = nearest_bucket(*aspect)
    except (ValueError, ZeroDivisionError):
        return params
    return params.model_copy(update={"aspect": aspect, "width": width, "height": height})


class JobService:
    """Creates jobs, enforces the per-member caps and hands jobs to the broker fairly."""

    def __init__(
        self,
        settings: BotSettings,
        sessions: async_sessionmaker[AsyncSession],
        dispatcher: Dispatcher,
        store: MediaStore,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.dispatcher = dispatcher
        self.store = store
        self.defaults = quota.QuotaDefaults.from_settings(settings)
        # One lock per member serialises release decisions in this process, so two completions
        # of the same member cannot both see room for one more job and send two.
        self._member_locks: dict[int, asyncio.Lock] = {}
        self._release_all_lock = asyncio.Lock()
        # Set by bot.delivery: called with a job id after a job failed before reaching a worker
        # (for example its input image vanished), so the member hears about it and is refunded.
        self.on_failed: Callable[[str], Awaitable[None]] | None = None

    # --- costs -------------------------------------------------------------------------------

    def cost_of(self, kind: JobKind, engine: Engine) -> int:
        """Credits a job costs (configurable; SPEC defaults: grid 1 / 2, upscale 1, crop 0)."""
        if kind == JobKind.CROP:
            return self.settings.cost_crop
        if kind == JobKind.UPSCALE:
            return self.settings.cost_upscale
        return self.settings.cost_openai_grid if engine == Engine.OPENAI else self.settings.cost_sdxl_grid

    # --- creation ----------------------------------------------------------------------------

    async def create_imagine(self, actor: Actor, params: GenerationParams) -> Created:
        """Accept an ``/imagine``: member, job row and charge in one transaction."""

        def plan(member: Member) -> _Plan:
            """Engine, visibility, aspect and seed from the prompt, then the member's defaults."""
            resolved = apply_member_aspect(params, member)
            return _Plan(
                params=resolved,
                engine=resolve_engine(resolved, member, self.settings),
                visibility=resolve_visibility(resolved, member, self.settings),
                seed=resolved.seed if resolved.seed is not None else random_seed(),
            )

        return await self._create(actor, Operation(JobKind.IMAGINE), plan)

    async def create_followup(
        self, actor: Actor, parent: Job, operation: Operation, *, parent_index: int | None = None
    ) -> Created:
        """Accept a button press on ``parent``: a new job owned and charged to the presser.

        Reroll gets a new random seed; everything else keeps the parent's seed so a variation
        of a seeded grid is reproducible too.
        """
        parent_params = GenerationParams.model_validate(
            {k: v for k, v in (parent.params or {}).items() if k not in OP_KEYS}
        )

        def plan(member: Member) -> _Plan:
            """The parent's prompt and engine; the presser's visibility unless they own it."""
            # The owner keeps the parent's visibility (a stealth grid stays stealth); anyone else
            # pressing a public job's button gets their own mode.
            if parent.user_id == actor.user_id:
                visibility = Visibility(parent.visibility)
            else:
                visibility = resolve_visibility(None, member, self.settings)
            seed = random_seed() if operation.kind == JobKind.REROLL else parent.seed
            return _Plan(
                params=parent_params,
                engine=Engine(parent.engine),
                visibility=visibility,
                seed=seed,
                parent=parent,
                parent_index=parent_index,
            )

        return await self._create(actor, operation, plan)

    async def _create(
        self, actor: Actor, operation: Operation, plan_for: Callable[[Member], _Plan]
    ) -> Created:
        async with self.sessions() as session, session.begin():
            member = await quota.get_or_create_member(
                session, actor.guild_id, actor.user_id, actor.display_name
            )
            # Lock the member row (PostgreSQL; SQLite's BEGIN IMMEDIATE already serialises
            # writers) so two simultaneous commands cannot both pass the cap check below.
            await session.execute(select(Member.id).where(Member.id == member.id).with_for_update())
            plan = plan_for(member)
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
                params={**plan.params.model_dump(mode="json"), **operation.as_dict()},
                seed=plan.seed,
                engine=plan.engine.value,
                visibility=plan.visibility.value,
                status=(JobStatus.RUNNING if operation.kind == JobKind.CROP else JobStatus.WAITING).value,
                cost=self.cost_of(operation.kind, plan.engine),
                application_id=actor.application_id,
                interaction_token=actor.interaction_token,
                created_at=utcnow(),
            )
            session.add(job)
            await session.flush()
            try:
                await quota.reserve(session, member.id, job.id, job.cost, self.defaults)
            except quota.InsufficientCredits as exc:
                raise NotEnoughCredits(credits_message(exc), exc) from exc
            position = await self._position(session, job) if operation.kind != JobKind.CROP else 0
        record_metric("record_accepted", job.kind, job.engine, job.cost)
        with job_context(job.id, member.id):
            log.info(
                "accepted job %s (%s, %s) for user %s in guild %s, cost %s",
                job.id,
                job.kind,
                job.engine,
                actor.user_id,
                actor.guild_id,
                job.cost,
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
        async with self._lock(member_id):
            async with self.sessions() as session:
                active = await session.scalar(
                    select(func.count())
                    .select_from(Job)
                    .where(Job.member_id == member_id, Job.status.in_(ACTIVE_STATUSES))
                )
                room = self.settings.max_running_per_member - int(active or 0)
                if room <= 0:
                    return 0
                waiting = (
                    await session.scalars(
                        select(Job)
                        .where(Job.member_id == member_id, Job.status == JobStatus.WAITING.value)
                        .order_by(Job.created_at, Job.id)
                        .limit(room)
                    )
                ).all()
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
        """The worker message for a job, with its input image read from the media store.

        Raises ``MediaNotFound`` when the parent's image is gone.
        """
        operation = Operation.from_job(job)
        params = GenerationParams.model_validate(
            {k: v for k, v in (job.params or {}).items() if k not in OP_KEYS}
        )
        input_image = None
        if job.parent_id and operation.kind not in (JobKind.REROLL, JobKind.IMAGINE):
            data = await self.input_image(job.parent_id, job.parent_index)
            input_image = base64.b64encode(data).decode("ascii")
        return JobRequest(
            job_id=job.id,
            kind=operation.kind,
            params=params,
            seed=job.seed,
            count=grid_count(operation.kind),
            strength=operation.strength,
            scale=operation.scale,
            direction=operation.direction,
            input_image=input_image,
            openai_model=self.settings.openai_model if job.engine == Engine.OPENAI.value else None,
        )

    async def input_image(self, parent_id: str, index: int | None) -> bytes:
        """The bytes of a parent's image: tile ``index`` of a grid, or its single image."""
        async with self.sessions() as session:
            rows = (await session.scalars(select(Image).where(Image.job_id == parent_id))).all()
        by_index = {row.index: row for row in rows}
        row = by_index.get(index or 0) or (by_index.get(0) if index is None else None)
        if row is None:
            raise MediaNotFound(f"{parent_id}/{index}")
        return await self.store.get(row.key)

    async def _dispatch(self, job: Job) -> bool:
        # The job's log lines (send failures, missing input) carry its id and member.
        with job_context(job.id, job.member_id):
            return await self._dispatch_job(job)

    async def _dispatch_job(self, job: Job) -> bool:
        try:
            request = await self.build_request(job)
        except (MediaNotFound, ValueError) as exc:
            log.warning("job %s cannot start: input image unavailable (%s)", job.id, exc)
            await self.fail(
                job.id,
                ErrorCode.BAD_INPUT,
                "The image this job starts from is no longer available.",
            )
            return False
        try:
            await self.dispatcher.send(request, Engine(job.engine))
        except Exception:
            log.warning("broker did not take job %s; it stays waiting", job.id, exc_info=True)
            return False
        async with self.sessions() as session, session.begin():
            # Conditional: a job cancelled meanwhile must not be resurrected as queued.
            await session.execute(
                update(Job)
                .where(Job.id == job.id, Job.status == JobStatus.WAITING.value)
                .values(status=JobStatus.QUEUED.value, queued_at=utcnow(), task_id=job.id)
            )
        return True

    # --- failure and cancel ------------------------------------------------------------------

    async def mark_failed(
        self,
        session: AsyncSession,
        job_id: str,
        code: ErrorCode,
        message: str,
        *,
        status: JobStatus = JobStatus.FAILED,
    ) -> Failed | None:
        """In the caller's transaction: finalise a job as failed and refund it, exactly once.

        Returns None when the job was already final (someone else finished it first).
        """
        result = await session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status.in_(PENDING_STATUSES))
            .values(
                status=status.value,
                error_code=code.value,
                error=message[:1000],
                finished_at=utcnow(),
                delivered=False,
            )
            .returning(Job.kind, Job.engine, Job.cost)
        )
        row = result.one_or_none()
        if row is None:
            return None
        refunded = await quota.refund(session, job_id)
        return Failed(job_id, row[0], row[1], code, row[2] if refunded else 0)

    async def fail(self, job_id: str, code: ErrorCode, message: str) -> bool:
        """Fail and refund a job in its own transaction, then tell the member."""
        async with self.sessions() as session, session.begin():
            failed = await self.mark_failed(session, job_id, code, message)
        return await self._after_failure(failed)

    async def cancel(self, job_id: str) -> bool:
        """Cancel a job: revoke it at the broker, refund it and tell the member."""
        await self.dispatcher.revoke(job_id)
        async with self.sessions() as session, session.begin():
            failed = await self.mark_failed(
                session, job_id, ErrorCode.CANCELLED, "The job was cancelled.", status=JobStatus.CANCELLED
            )
        return await self._after_failure(failed)

    async def _after_failure(self, failed: Failed | None) -> bool:
        """After the commit: count it, then let delivery tell the member."""
        if failed is None:
            return False
        record_metric("record_failed", failed.kind, failed.engine, failed.code.value)
        if failed.refunded:
            record_metric("record_refunded", failed.kind, failed.engine, failed.refunded)
        if self.on_failed is not None:
            await self.on_failed(failed.job_id)
        return True

    # --- queries for /info and /status ---------------------------------------------------------

    async def member_counts(self, member_id: int) -> dict[str, int]:
        """The member's jobs per pending status."""
        async with self.sessions() as session:
            rows = await session.execute(
                select(Job.status, func.count())
                .where(Job.member_id == member_id, Job.status.in_(PENDING_STATUSES))
                .group_by(Job.status)
            )
            return {status: n for status, n in rows.all()}

    async def status_counts(self, since: datetime) -> dict[str, Any]:
        """Counts for ``/status``: pending jobs per status and engine, and the last hour's results."""
        async with self.sessions() as session:
            pending = (
                await session.execute(
                    select(Job.engine, Job.status, func.count())
                    .where(Job.status.in_(PENDING_STATUSES), Job.kind != JobKind.CROP.value)
                    .group_by(Job.engine, Job.status)
                )
            ).all()
            recent = (
                await session.execute(
                    select(Job.status, func.count()).where(Job.created_at >= since).group_by(Job.status)
                )
            ).all()
        return {
            "pending": {(engine, status): n for engine, status, n in pending},
            "recent": {status: n for status, n in recent},
        }


def credits_message(exc: quota.InsufficientCredits) -> str:
    """The member-facing refusal for a job they cannot afford."""
    stamp = int(exc.resets_at.timestamp())
    return (
        f"You have {exc.remaining} credit{'s' if exc.remaining != 1 else ''} left; this costs {exc.cost}. "
        f"Your credits reset <t:{stamp}:R>."
    )
