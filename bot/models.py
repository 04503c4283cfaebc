"""The bot's database: typed SQLAlchemy 2 models for guilds, members, jobs, images and credits."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy import false as sa_false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

# Stable constraint names so Alembic batch mode on SQLite can alter them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Timezone-aware now, the only clock the models use."""
    return datetime.now(UTC)


def new_token() -> str:
    """An unguessable id for URLs and custom_ids: 128 random bits, 22 url-safe characters."""
    return secrets.token_urlsafe(16)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores aware datetimes; SQLite drops the zone, so it is put back as UTC on the way out."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        # SQLite keeps only the digits: an aware time in another zone must become UTC first, or
        # it would be read back (and compared) as that wall-clock time in UTC.
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    """Declarative base with the naming convention above."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class JobStatus(StrEnum):
    """A job's life: waiting (held by the bot for fairness) → queued → running → final."""

    WAITING = "waiting"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        """Whether nothing more will happen to a job in this state."""
        return self in (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED)


class LedgerKind(StrEnum):
    """Why a credit entry exists."""

    RESERVE = "reserve"
    REFUND = "refund"
    GRANT = "grant"
    RESET = "reset"


class Guild(Base):
    """A Discord server and its defaults (admins set them with ``/quota default``)."""

    __tablename__ = "guilds"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(100), default="")
    credit_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    credit_period: Mapped[str | None] = mapped_column(String(8), nullable=True)
    default_engine: Mapped[str | None] = mapped_column(String(16), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # Access (bot/access.py): the owner's approval when ALLOWED_GUILD_IDS restricts guilds, or a ban.
    approved: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())
    banned: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())


class Member(Base):
    """A Discord user within one guild: settings, credit account and gallery identity.

    Guild id 0 stands for direct messages.
    """

    __tablename__ = "members"
    __table_args__ = (UniqueConstraint("guild_id", "user_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    guild_id: Mapped[int] = mapped_column(BigInteger, index=True)
    user_id: Mapped[int] = mapped_column(BigInteger, index=True)
    display_name: Mapped[str] = mapped_column(String(100), default="")
    public_id: Mapped[str] = mapped_column(String(32), unique=True, default=new_token)
    visibility: Mapped[str | None] = mapped_column(String(8), nullable=True)
    default_engine: Mapped[str | None] = mapped_column(String(16), nullable=True)
    default_aspect: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # Credit account: usage in the current period, the member's own limit/period overriding the
    # guild's, and granted credits that outlive period resets until spent.
    credit_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    credit_period: Mapped[str | None] = mapped_column(String(8), nullable=True)
    period_start: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    credits_used: Mapped[int] = mapped_column(Integer, default=0)
    bonus_credits: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # /prefer: text appended to every prompt, and whether buttons open the Remix editor first.
    prompt_suffix: Mapped[str | None] = mapped_column(Text, nullable=True)
    remix: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())
    banned: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())

    jobs: Mapped[list[Job]] = relationship(back_populates="member", lazy="raise")


class Job(Base):
    """Every action is a job: owner, where it came from, what it does, how it went."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_member_status", "member_id", "status"),
        Index("ix_jobs_status_created", "status", "created_at"),
        Index("ix_jobs_visibility_created", "visibility", "created_at"),
        # The tracker's poll for finished jobs not yet delivered (twice a second): the statuses
        # it asks for are nearly every job, so only ``delivered`` narrows it.
        Index("ix_jobs_delivered_finished", "delivered", "finished_at"),
        # A DM's paying account: the user's latest guild job (bot.access.account_guild).
        Index("ix_jobs_user_created", "user_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_token)
    member_id: Mapped[int] = mapped_column(ForeignKey("members.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(BigInteger)
    guild_id: Mapped[int] = mapped_column(BigInteger)
    channel_id: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(16))
    parent_id: Mapped[str | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True, index=True
    )
    parent_index: Mapped[int | None] = mapped_column(Integer, nullable=True)  # which image, 1-4
    prompt: Mapped[str] = mapped_column(Text, default="")
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    seed: Mapped[int] = mapped_column(BigInteger, default=0)
    engine: Mapped[str] = mapped_column(String(16))
    visibility: Mapped[str] = mapped_column(String(8))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.WAITING)
    cost: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(32), nullable=True)
    task_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    progress: Mapped[int] = mapped_column(Integer, default=0)
    # Discord delivery: the interaction token lives 15 minutes; after that the bot token posts.
    application_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    interaction_token: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The interaction follow-up this job's messages edit (a batch's later jobs); NULL: the
    # original response.
    reply_message_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    message_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    delivered: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    queued_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    generation_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Times the supervisor put it back in line after its worker stopped sending heartbeats.
    resends: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    member: Mapped[Member] = relationship(back_populates="jobs", lazy="raise")
    images: Mapped[list[Image]] = relationship(back_populates="job", lazy="raise", order_by="Image.index")


class Image(Base):
    """A stored result image: the key in the media store, never a Discord CDN link."""

    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("job_id", "index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)  # 0 = the full grid / single image; 1-4 = tiles
    key: Mapped[str] = mapped_column(String(255))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    content_type: Mapped[str] = mapped_column(String(32), default="image/png")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    job: Mapped[Job] = relationship(back_populates="images", lazy="raise")


class CreditEntry(Base):
    """The credits ledger. The unique (job, kind) key makes reserve and refund happen once."""

    __tablename__ = "credit_entries"
    __table_args__ = (UniqueConstraint("job_id", "kind", name="uq_credit_entries_job_kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    member_id: Mapped[int] = mapped_column(ForeignKey("members.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    kind: Mapped[str] = mapped_column(String(8))
    amount: Mapped[int] = mapped_column(Integer)  # positive spends, negative gives back
    actor_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # admin for grants
    note: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Favourite(Base):
    """A member's ❤️ on a job: one per member and job; counts drive the gallery's "top" view."""

    __tablename__ = "favourites"
    __table_args__ = (UniqueConstraint("member_id", "job_id", name="uq_favourites_member_job"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    member_id: Mapped[int] = mapped_column(ForeignKey("members.id", ondelete="CASCADE"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class MemberOption(Base):
    """A member's ``/prefer option``: ``--name`` in their prompts expands to ``value``."""

    __tablename__ = "member_options"
    __table_args__ = (UniqueConstraint("member_id", "name", name="uq_member_options_member_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    member_id: Mapped[int] = mapped_column(ForeignKey("members.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(32))
    value: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class PendingConfirmation(Base):
    """An action waiting for its member's Yes/No (bot/confirm.py); the id is in the buttons."""

    __tablename__ = "pending_confirmations"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_token)
    user_id: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)


class JobInput(Base):
    """An image a member gave a job (attachment, image prompt, --sref/--cref/--oref), stored."""

    __tablename__ = "job_inputs"
    __table_args__ = (UniqueConstraint("job_id", "role", "index", name="uq_job_inputs_job_role_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    role: Mapped[str] = mapped_column(String(16))  # image, style, character, omni
    index: Mapped[int] = mapped_column(Integer)
    key: Mapped[str] = mapped_column(String(255))


class GlobalDefaults(Base):
    """The owners' ``/mirage defaults``: one row (id 1) between the settings and each guild/member."""

    __tablename__ = "global_defaults"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    credit_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    credit_period: Mapped[str | None] = mapped_column(String(16), nullable=True)
    default_engine: Mapped[str | None] = mapped_column(String(16), nullable=True)
    default_visibility: Mapped[str | None] = mapped_column(String(16), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
