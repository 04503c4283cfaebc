"""The result buttons, as discord.py ``DynamicItem`` s so they survive restarts.

All state is in the ``custom_id``: ``mj:<action>:<job id>[:<arg>]`` (job ids are 22 url-safe
characters, so the longest id, ``mj:vary:<22>:strong``, is 37 characters, far below Discord's
100). When a button is pressed the item is rebuilt from the id by its template and the job is
loaded from the database, so a new bot process handles presses on messages sent by an old one.

==========================  ===============================  ==================================
custom_id                   button                           job created
==========================  ===============================  ==================================
``mj:u:<id>:<1-4>``         U1..U4 on a grid                 crop (no generation, cost 0)
``mj:v:<id>:<1-4>``         V1..V4 on a grid                 variation, strength 0.85
``mj:r:<id>``               🔄 on a grid                     reroll: same params, new seed
``mj:vary:<id>:subtle``     Vary (Subtle) / (Strong)         variation 0.5 / 0.85
``mj:up:<id>:subtle``       Upscale (Subtle) / (Creative)    upscale 2x, denoise 0.35 / 0.55
``mj:zoom:<id>:2``          Zoom Out 2x / 1.5x               zoom (outpaint)
``mj:pan:<id>:l``           ⬅️ ➡️ ⬆️ ⬇️                      pan (outpaint one side)
``mj:sq:<id>``              Make Square (non-square only)    square (outpaint to 1:1)
==========================  ===============================  ==================================

Every press checks, before answering: the job exists (a missing or forged id gets "This job no
longer exists"), it is finished, and for a stealth job that the presser is its owner (others get
a refusal that says nothing about the job). Anyone else's public job can be built upon: the new
job is owned by, and charged to, the presser.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import TYPE_CHECKING, Any

import discord
from discord import ui
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from bot.jobs import SINGLE_IMAGE_KINDS, Actor, JobRefused, Operation
from bot.models import Job, JobStatus
from workers.schema import Direction, JobKind, Visibility

if TYPE_CHECKING:
    from bot.client import MirageBot

log = logging.getLogger(__name__)

JOB_ID = r"(?P<job>[A-Za-z0-9_-]{1,32})"
MISSING_JOB = "This job no longer exists."
NOT_YOURS = "Only the creator of this image can use its buttons."
NOT_READY = "This job is not finished yet."
LOOKUP_BUDGET_S = 1.0  # of Discord's 3 s to answer a press

VARY_STRENGTH = {"subtle": 0.5, "strong": 0.85}
GRID_VARIATION_STRENGTH = 0.85  # V# on a grid is Vary (Strong)
UPSCALE_STRENGTH = {"subtle": 0.35, "creative": 0.55}
UPSCALE_FACTOR = 2.0
ZOOM_SCALES = {"2": 2.0, "1.5": 1.5}
PAN_DIRECTIONS = {"l": Direction.LEFT, "r": Direction.RIGHT, "u": Direction.UP, "d": Direction.DOWN}
PAN_EMOJI = {"l": "⬅️", "r": "➡️", "u": "⬆️", "d": "⬇️"}


def actor_from(interaction: discord.Interaction[Any]) -> Actor:
    """The facts of an interaction that a job keeps (who, where, and how to answer later)."""
    user = interaction.user
    return Actor(
        guild_id=interaction.guild_id or 0,
        channel_id=interaction.channel_id or 0,
        user_id=user.id,
        display_name=getattr(user, "display_name", None) or user.name,
        application_id=interaction.application_id,
        interaction_token=interaction.token,
    )


async def refuse(interaction: discord.Interaction[Any], message: str) -> None:
    """An ephemeral refusal, whether or not the interaction was answered already.

    After a public deferral the first followup would edit the public "thinking…" message, so
    that message is deleted first and the refusal sent as a fresh ephemeral followup.
    """
    if not interaction.response.is_done():
        await interaction.response.send_message(message, ephemeral=True)
        return
    try:
        await interaction.delete_original_response()
    except discord.HTTPException:
        log.debug("could not delete the deferred response", exc_info=True)
    await interaction.followup.send(message, ephemeral=True)


# Said when the database cannot be reached while accepting a job: the job row and its charge are
# one transaction, so nothing was created or charged, and the member should simply retry.
DATABASE_UNAVAILABLE = (
    "Mirage can't reach its database right now, so this was not started and nothing was charged. "
    "Please try again in a minute."
)
# What an unreachable database raises: SQLAlchemy wraps driver errors; a refused or reset socket
# can surface as OSError, and a hung one as a timeout.
DATABASE_ERRORS: tuple[type[BaseException], ...] = (SQLAlchemyError, OSError, TimeoutError)


async def start_job(
    interaction: discord.Interaction[Any],
    parent: Job,
    operation: Operation,
    parent_index: int | None = None,
) -> None:
    """Accept a press: defer at once, create the job, then show it waiting or finish a crop."""
    bot: MirageBot = interaction.client  # type: ignore[assignment]
    if not interaction.response.is_done():
        await interaction.response.defer(thinking=True)
    try:
        created = await bot.jobs.create_followup(
            actor_from(interaction), parent, operation, parent_index=parent_index
        )
    except JobRefused as exc:
        await refuse(interaction, str(exc))
        return
    except DATABASE_ERRORS:
        # Without this the member would stare at "thinking…" forever (SPEC §3).
        log.exception("could not accept a button press: database unavailable")
        await refuse(interaction, DATABASE_UNAVAILABLE)
        return
    job = created.job
    bot.delivery.remember_limit(job.id, interaction.filesize_limit)
    if operation.kind == JobKind.CROP:
        await bot.delivery.run_crop(job.id)
        return
    await bot.delivery.show_waiting(job, created.position)
    await bot.jobs.release(job.member_id)
    bot.delivery.wake()


class _JobButtonMixin:
    """Shared press handling: load the job, check who may press, then run the action."""

    job_id: str
    parent: Job | None = None

    async def interaction_check(self, interaction: discord.Interaction[Any], /) -> bool:
        """Load the job; refuse (privately) missing jobs, unfinished ones and others' stealth jobs."""
        bot: MirageBot = interaction.client  # type: ignore[assignment]
        lookup = asyncio.ensure_future(_load_job(bot, self.job_id))
        # A refusal reads best as a private reply without a public "thinking…" first, so the
        # job is looked up before answering, but never at the cost of Discord's 3 s deadline:
        # when the database is slow, defer now and refuse (privately) afterwards.
        done, _ = await asyncio.wait({lookup}, timeout=LOOKUP_BUDGET_S)
        if not done:
            await interaction.response.defer(thinking=True)
        job = await lookup
        if job is None:
            await refuse(interaction, MISSING_JOB)
            return False
        if job.visibility == Visibility.STEALTH.value and job.user_id != interaction.user.id:
            await refuse(interaction, NOT_YOURS)
            return False
        if job.status != JobStatus.DONE.value:
            await refuse(interaction, NOT_READY if not JobStatus(job.status).is_final else MISSING_JOB)
            return False
        self.parent = job
        return True


async def _load_job(bot: MirageBot, job_id: str) -> Job | None:
    async with bot.sessions() as session:
        return (await session.scalars(select(Job).where(Job.id == job_id))).first()


def _button(label: str | None, custom_id: str, *, row: int, emoji: str | None = None) -> ui.Button[Any]:
    return ui.Button(
        label=label, emoji=emoji, custom_id=custom_id, style=discord.ButtonStyle.secondary, row=row
    )


class TileButton(
    _JobButtonMixin,
    ui.DynamicItem[ui.Button[Any]],
    template=rf"mj:(?P<action>[uv]):{JOB_ID}:(?P<index>[1-4])",
):
    """U1..U4 (crop the tile) and V1..V4 (strong variation of the tile) on a grid."""

    def __init__(self, action: str, job_id: str, index: int) -> None:
        self.action, self.job_id, self.index = action, job_id, index
        super().__init__(
            _button(
                f"{action.upper()}{index}", f"mj:{action}:{job_id}:{index}", row=0 if action == "u" else 1
            )
        )

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction[Any], item: ui.Item[Any], match: re.Match[str], /
    ) -> TileButton:
        """Rebuild the button from its custom_id (called by discord.py on a press)."""
        return cls(match["action"], match["job"], int(match["index"]))

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        """Start the job this button stands for."""
        assert self.parent is not None
        if self.action == "u":
            await start_job(interaction, self.parent, Operation(JobKind.CROP), self.index)
        else:
            operation = Operation(JobKind.VARIATION, strength=GRID_VARIATION_STRENGTH)
            await start_job(interaction, self.parent, operation, self.index)


class RerollButton(_JobButtonMixin, ui.DynamicItem[ui.Button[Any]], template=rf"mj:r:{JOB_ID}"):
    """🔄: the same prompt and parameters with a new random seed."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(_button(None, f"mj:r:{job_id}", row=0, emoji="🔄"))

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction[Any], item: ui.Item[Any], match: re.Match[str], /
    ) -> RerollButton:
        """Rebuild the button from its custom_id (called by discord.py on a press)."""
        return cls(match["job"])

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        """Start the job this button stands for."""
        assert self.parent is not None
        await start_job(interaction, self.parent, Operation(JobKind.REROLL))


class VaryButton(
    _JobButtonMixin, ui.DynamicItem[ui.Button[Any]], template=rf"mj:vary:{JOB_ID}:(?P<mode>subtle|strong)"
):
    """Vary (Subtle) / Vary (Strong) on a single image: a new grid by img2img."""

    def __init__(self, job_id: str, mode: str) -> None:
        self.job_id, self.mode = job_id, mode
        super().__init__(
            _button(f"Vary ({mode.capitalize()})", f"mj:vary:{job_id}:{mode}", row=0, emoji="🪄")
        )

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction[Any], item: ui.Item[Any], match: re.Match[str], /
    ) -> VaryButton:
        """Rebuild the button from its custom_id (called by discord.py on a press)."""
        return cls(match["job"], match["mode"])

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        """Start the job this button stands for."""
        assert self.parent is not None
        operation = Operation(JobKind.VARIATION, strength=VARY_STRENGTH[self.mode])
        await start_job(interaction, self.parent, operation)


class UpscaleButton(
    _JobButtonMixin, ui.DynamicItem[ui.Button[Any]], template=rf"mj:up:{JOB_ID}:(?P<mode>subtle|creative)"
):
    """Upscale (Subtle) / Upscale (Creative): one image at twice the size."""

    def __init__(self, job_id: str, mode: str) -> None:
        self.job_id, self.mode = job_id, mode
        super().__init__(
            _button(f"Upscale ({mode.capitalize()})", f"mj:up:{job_id}:{mode}", row=1, emoji="⬆️")
        )

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction[Any], item: ui.Item[Any], match: re.Match[str], /
    ) -> UpscaleButton:
        """Rebuild the button from its custom_id (called by discord.py on a press)."""
        return cls(match["job"], match["mode"])

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        """Start the job this button stands for."""
        assert self.parent is not None
        operation = Operation(JobKind.UPSCALE, strength=UPSCALE_STRENGTH[self.mode], scale=UPSCALE_FACTOR)
        await start_job(interaction, self.parent, operation)


class ZoomButton(
    _JobButtonMixin, ui.DynamicItem[ui.Button[Any]], template=rf"mj:zoom:{JOB_ID}:(?P<scale>2|1\.5)"
):
    """Zoom Out 2x / 1.5x: the image smaller on the same canvas, the border painted in."""

    def __init__(self, job_id: str, scale: str) -> None:
        self.job_id, self.scale = job_id, scale
        super().__init__(_button(f"Zoom Out {scale}x", f"mj:zoom:{job_id}:{scale}", row=2, emoji="🔍"))

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction[Any], item: ui.Item[Any], match: re.Match[str], /
    ) -> ZoomButton:
        """Rebuild the button from its custom_id (called by discord.py on a press)."""
        return cls(match["job"], match["scale"])

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        """Start the job this button stands for."""
        assert self.parent is not None
        await start_job(interaction, self.parent, Operation(JobKind.ZOOM, scale=ZOOM_SCALES[self.scale]))


class PanButton(
    _JobButtonMixin, ui.DynamicItem[ui.Button[Any]], template=rf"mj:pan:{JOB_ID}:(?P<dir>[lrud])"
):
    """⬅️ ➡️ ⬆️ ⬇️: extend the image on one side."""

    def __init__(self, job_id: str, direction: str) -> None:
        self.job_id, self.direction = job_id, direction
        super().__init__(_button(None, f"mj:pan:{job_id}:{direction}", row=3, emoji=PAN_EMOJI[direction]))

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction[Any], item: ui.Item[Any], match: re.Match[str], /
    ) -> PanButton:
        """Rebuild the button from its custom_id (called by discord.py on a press)."""
        return cls(match["job"], match["dir"])

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        """Start the job this button stands for."""
        assert self.parent is not None
        operation = Operation(JobKind.PAN, direction=PAN_DIRECTIONS[self.direction])
        await start_job(interaction, self.parent, operation)


class SquareButton(_JobButtonMixin, ui.DynamicItem[ui.Button[Any]], template=rf"mj:sq:{JOB_ID}"):
    """Make Square: outpaint a non-square image to 1:1."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(_button("Make Square", f"mj:sq:{job_id}", row=2, emoji="↔️"))

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction[Any], item: ui.Item[Any], match: re.Match[str], /
    ) -> SquareButton:
        """Rebuild the button from its custom_id (called by discord.py on a press)."""
        return cls(match["job"])

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        """Start the job this button stands for."""
        assert self.parent is not None
        await start_job(interaction, self.parent, Operation(JobKind.SQUARE))


DYNAMIC_ITEMS: tuple[type[ui.DynamicItem[Any]], ...] = (
    TileButton,
    RerollButton,
    VaryButton,
    UpscaleButton,
    ZoomButton,
    PanButton,
    SquareButton,
)


def grid_items(job_id: str) -> list[ui.Item[Any]]:
    """Row 1: U1 U2 U3 U4 🔄; row 2: V1 V2 V3 V4."""
    items: list[ui.Item[Any]] = [TileButton("u", job_id, n) for n in range(1, 5)]
    items.append(RerollButton(job_id))
    items.extend(TileButton("v", job_id, n) for n in range(1, 5))
    return items


def single_items(job_id: str, width: int, height: int, *, upscale: bool = True) -> list[ui.Item[Any]]:
    """The buttons under one image: vary, upscale, zoom, Make Square (non-square only), pan."""
    items: list[ui.Item[Any]] = [VaryButton(job_id, "subtle"), VaryButton(job_id, "strong")]
    if upscale:
        items += [UpscaleButton(job_id, "subtle"), UpscaleButton(job_id, "creative")]
    items += [ZoomButton(job_id, "2"), ZoomButton(job_id, "1.5")]
    if width != height:
        items.append(SquareButton(job_id))
    items += [PanButton(job_id, d) for d in ("l", "r", "u", "d")]
    return items


def result_view(job: Job, width: int, height: int) -> ui.View:
    """The view for a finished job's message.

    The view is stopped before it is returned: presses are routed by the dynamic item templates,
    so discord.py must not also keep every sent view in memory forever (``timeout=None`` views
    are never evicted).
    """
    view = ui.View(timeout=None)
    kind = JobKind(job.kind)
    if kind in SINGLE_IMAGE_KINDS:
        # An upscaled image offers vary/zoom/pan but not another upscale (it is already 2x).
        items = single_items(job.id, width, height, upscale=kind != JobKind.UPSCALE)
    else:
        items = grid_items(job.id)
    for item in items:
        view.add_item(item)
    view.stop()
    return view
