"""The result buttons: one table of actions and one ``DynamicItem`` class that reads it.

All state is in the ``custom_id``: ``mj:<action>:<job id>[:<arg>]`` (job ids are 22 url-safe
characters, so the longest id, ``mj:vary:<22>:strong``, is 37 characters, far below Discord's
100). When a button is pressed the item is rebuilt from the id and the job is loaded from the
database, so a new bot process handles presses on messages sent by an old one. The ids below are
on messages already sent: they must keep working, so an action's code and argument never change.

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
job is owned by, and charged to, the presser. Once a job is accepted, the pressed button turns
blue (primary) on the source message, as Midjourney's do; it stays usable.

The other buttons under a result live beside their logic and share :func:`load_source`:
``mj:cz:<id>`` Custom Zoom (``bot.custom_zoom``), ``mj:region:<id>`` Vary (Region)
(``bot.region``), ``mj:web:<id>`` and ``mj:fav:<id>`` (``bot.links``), and ``mj:x:<id>`` Cancel
on a waiting or running job's message (``bot.cancel``). ``bot.views`` lists them all for the
client to register.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import discord
from discord import ui
from sqlalchemy import select

from bot import remix
from bot.interactions import DATABASE_ERRORS, DATABASE_UNAVAILABLE, refuse
from bot.models import Job, JobStatus
from bot.operations import Operation
from workers.schema import Direction, JobKind, Visibility

if TYPE_CHECKING:
    from bot.client import MirageBot

log = logging.getLogger(__name__)

JOB_ID_CHARS = r"[A-Za-z0-9_-]{1,32}"
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
PRESSED_MEMORY = 1024  # messages whose pressed buttons this process remembers (most recent)


@dataclass(frozen=True, slots=True)
class Action:
    """One kind of button: its custom_id code and argument, its look, and the job it starts.

    ``start`` maps the argument to the operation and, for a grid tile, the tile's index.
    """

    code: str
    arg: str | None  # regex of the argument, None when the id has none
    row: int
    start: Callable[[str], tuple[Operation, int | None]]
    label: Callable[[str], str | None] = lambda _arg: None
    emoji: Callable[[str], str | None] = lambda _arg: None

    @property
    def pattern(self) -> str:
        """This action's custom_ids, as a regex."""
        tail = f":(?:{self.arg})" if self.arg else ""
        return f"mj:{self.code}:{JOB_ID_CHARS}{tail}"


ACTIONS: dict[str, Action] = {
    action.code: action
    for action in (
        Action("u", "[1-4]", 0, lambda n: (Operation(JobKind.CROP), int(n)), label=lambda n: f"U{n}"),
        Action(
            "v",
            "[1-4]",
            1,
            lambda n: (Operation(JobKind.VARIATION, strength=GRID_VARIATION_STRENGTH), int(n)),
            label=lambda n: f"V{n}",
        ),
        Action("r", None, 0, lambda _: (Operation(JobKind.REROLL), None), emoji=lambda _: "🔄"),
        Action(
            "vary",
            "subtle|strong",
            0,
            lambda mode: (Operation(JobKind.VARIATION, strength=VARY_STRENGTH[mode]), None),
            label=lambda mode: f"Vary ({mode.capitalize()})",
            emoji=lambda _: "🪄",
        ),
        Action(
            "up",
            "subtle|creative",
            1,
            lambda mode: (
                Operation(JobKind.UPSCALE, strength=UPSCALE_STRENGTH[mode], scale=UPSCALE_FACTOR),
                None,
            ),
            label=lambda mode: f"Upscale ({mode.capitalize()})",
            emoji=lambda _: "⬆️",
        ),
        Action(
            "zoom",
            r"2|1\.5",
            2,
            lambda scale: (Operation(JobKind.ZOOM, scale=ZOOM_SCALES[scale]), None),
            label=lambda scale: f"Zoom Out {scale}x",
            emoji=lambda _: "🔍",
        ),
        Action(
            "pan",
            "[lrud]",
            3,
            lambda side: (Operation(JobKind.PAN, direction=PAN_DIRECTIONS[side]), None),
            emoji=lambda side: PAN_EMOJI[side],
        ),
        Action(
            "sq",
            None,
            2,
            lambda _: (Operation(JobKind.SQUARE), None),
            label=lambda _: "Make Square",
            emoji=lambda _: "↔️",
        ),
    )
}
# Every action's ids in one template, so discord.py routes exactly the ids the table defines.
TEMPLATE = "(?P<id>" + "|".join(f"(?:{action.pattern})" for action in ACTIONS.values()) + ")"


def parse_custom_id(custom_id: str) -> tuple[Action, str, str] | None:
    """The action, job id and argument of a button's custom_id, or None if it is not one of ours."""
    if not re.fullmatch(TEMPLATE, custom_id):
        return None
    _prefix, code, job_id, *rest = custom_id.split(":")
    return ACTIONS[code], job_id, rest[0] if rest else ""


class JobButton(ui.DynamicItem[ui.Button[Any]], template=TEMPLATE):
    """Any result button: the action table says what it looks like and which job it starts."""

    def __init__(self, code: str, job_id: str, arg: str = "") -> None:
        self.action = ACTIONS[code]
        self.job_id, self.arg = job_id, arg
        self.source_job: Job | None = None
        custom_id = f"mj:{code}:{job_id}" + (f":{arg}" if arg else "")
        super().__init__(
            ui.Button(
                label=self.action.label(arg),
                emoji=self.action.emoji(arg),
                custom_id=custom_id,
                style=discord.ButtonStyle.secondary,
                row=self.action.row,
            )
        )

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction[Any], item: ui.Item[Any], match: re.Match[str], /
    ) -> JobButton:
        """Rebuild the button from its custom_id (called by discord.py on a press)."""
        parsed = parse_custom_id(match["id"])
        assert parsed is not None  # the template matched, so the table knows the id
        action, job_id, arg = parsed
        return cls(action.code, job_id, arg)

    async def interaction_check(self, interaction: discord.Interaction[Any], /) -> bool:
        """Load the job; refuse (privately) missing jobs, unfinished ones and others' stealth jobs."""
        self.source_job = await load_source(interaction, self.job_id)
        return self.source_job is not None

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        """Start the job this button stands for."""
        assert self.source_job is not None
        operation, index = self.action.start(self.arg)
        bot: MirageBot = interaction.client  # type: ignore[assignment]
        # Remix mode: the prompt editor opens first; its submit starts the job (remix_submitted).
        label = self.item.label or self.action.code
        if await remix.maybe_open(interaction, self.source_job, self.action.code, label=label):
            return
        if await bot.flow.press(interaction, self.source_job, operation, index) is not None:
            await mark_pressed(interaction)


ModalHandler = Callable[[discord.Interaction[Any], re.Match[str]], Awaitable[None]]
# Forms handled from their custom_id and fields alone: (custom_id pattern, the custom_id of the
# button that opened one, formatted with the match's groups, handler).
_MODAL_ROUTES: list[tuple[re.Pattern[str], str, ModalHandler]] = []


def on_modal_submit(pattern: str, button: str, handler: ModalHandler) -> None:
    """Handle submits of forms whose custom_id fully matches ``pattern`` (call once, at import).

    discord.py finds a submitted form only among the modal objects of this process, so a form
    left open across a restart would get no answer at all; :func:`remix_submitted` routes it.
    """
    _MODAL_ROUTES.append((re.compile(pattern), button, handler))


def opening_button(custom_id: str) -> str:
    """The custom_id of the button a form was opened from; a button's own id is returned as is."""
    button = custom_id.removeprefix(remix.MODAL_PREFIX)
    if button != custom_id and parse_custom_id(button) is not None:
        return button
    for pattern, template, _handler in _MODAL_ROUTES:
        if match := pattern.fullmatch(custom_id):
            return template.format(**match.groupdict())
    return custom_id


async def remix_submitted(interaction: discord.Interaction[Any]) -> None:
    """A Remix editor's submit: the button and job come from its custom_id, the edit from its field.

    Handled here rather than by the modal object, which a bot restart forgets; so are the forms
    registered with :func:`on_modal_submit` (Custom Zoom).
    """
    if interaction.type != discord.InteractionType.modal_submit:
        return
    custom_id = str((interaction.data or {}).get("custom_id") or "")
    for pattern, _button, handler in _MODAL_ROUTES:
        if match := pattern.fullmatch(custom_id):
            await handler(interaction, match)
            return
    button = custom_id.removeprefix(remix.MODAL_PREFIX)
    parsed = parse_custom_id(button)
    text = remix.submitted_text(interaction)
    if button == custom_id or parsed is None or text is None:
        return
    action, job_id, arg = parsed
    source = await load_source(interaction, job_id)
    if source is None:
        return
    operation, index = action.start(arg)
    if await remix.submit(interaction, source, operation, index, text):
        await mark_pressed(interaction, custom_id=button)


async def load_job(bot: MirageBot, job_id: str) -> Job | None:
    """The job row with this id, or None."""
    async with bot.sessions() as session:
        return (await session.scalars(select(Job).where(Job.id == job_id))).first()


async def load_source(
    interaction: discord.Interaction[Any], job_id: str, *, owner_only: bool = False, private: bool = False
) -> Job | None:
    """The finished job a press acts on, or None after refusing the press privately.

    Refused: a missing or forged job, an unfinished one, a stealth job of someone else, and with
    ``owner_only`` any job of someone else (the link would not open for them). ``private``: the
    press will be answered ephemerally, so a slow lookup defers ephemerally too.
    """
    bot: MirageBot = interaction.client  # type: ignore[assignment]
    lookup = asyncio.ensure_future(load_job(bot, job_id))
    # A refusal reads best as a private reply without a public "thinking…" first, so the job
    # is looked up before answering, but never at the cost of Discord's 3 s deadline: when the
    # database is slow, defer now and refuse (privately) afterwards.
    done, _ = await asyncio.wait({lookup}, timeout=LOOKUP_BUDGET_S)
    if not done:
        await interaction.response.defer(thinking=True, ephemeral=private)
    try:
        job = await lookup
    except DATABASE_ERRORS:
        # Unanswered, the press would read "This interaction failed" with no reason given.
        log.exception("could not look up job %s for a press", job_id)
        await refuse(interaction, DATABASE_UNAVAILABLE)
        return None
    if job is None:
        await refuse(interaction, MISSING_JOB)
        return None
    hidden = job.visibility == Visibility.STEALTH.value or owner_only
    if hidden and job.user_id != interaction.user.id:
        await refuse(interaction, NOT_YOURS)
        return None
    if job.status != JobStatus.DONE.value:
        await refuse(interaction, NOT_READY if not JobStatus(job.status).is_final else MISSING_JOB)
        return None
    return job


async def answer_privately(
    interaction: discord.Interaction[Any], text: str, *, view: ui.View | None = None
) -> None:
    """An ephemeral answer, whether or not a slow lookup already deferred the press (privately)."""
    if interaction.response.is_done():
        await interaction.followup.send(text, ephemeral=True, view=view or discord.utils.MISSING)
    else:
        await interaction.response.send_message(text, ephemeral=True, view=view or discord.utils.MISSING)


def pressed_view(message: discord.Message, custom_id: str | set[str]) -> ui.View | None:
    """The message's components with the ``custom_id`` button(s) primary, or None if they already are.

    The view is stopped: it only describes the look, presses are still routed by custom_id.
    """
    wanted = {custom_id} if isinstance(custom_id, str) else custom_id
    view = ui.View.from_message(message, timeout=None)
    view.stop()
    changed = False
    for item in view.children:
        if isinstance(item, ui.Button) and item.custom_id in wanted:
            changed = changed or item.style != discord.ButtonStyle.primary
            item.style = discord.ButtonStyle.primary
    return view if changed else None


def pressed_button(interaction: discord.Interaction[Any]) -> dict[str, Any] | None:
    """Where the pressed button is (channel, message, custom_id), for marking it after a question.

    For a form's submit, the button is the one that opened the form (the form's id is on no button).
    """
    message = interaction.message
    custom_id = (interaction.data or {}).get("custom_id")
    if message is None or not isinstance(custom_id, str):
        return None
    button = opening_button(custom_id)
    return {"channel_id": message.channel.id, "message_id": message.id, "custom_id": button}


# Per message: a lock ordering this process's edits, and the buttons it turned blue. A press
# carries the message as it was when pressed, so an edit built from that alone would undo the
# blue of a press that landed meanwhile (members press U1 to U4 in quick succession).
_PRESSED: OrderedDict[int, tuple[asyncio.Lock, set[str]]] = OrderedDict()


def _pressed_on(message_id: int) -> tuple[asyncio.Lock, set[str]]:
    entry = _PRESSED.pop(message_id, None) or (asyncio.Lock(), set())
    _PRESSED[message_id] = entry  # most recent last
    while len(_PRESSED) > PRESSED_MEMORY:
        _PRESSED.popitem(last=False)
    return entry


async def _turn_blue(message: discord.Message, custom_id: str) -> None:
    lock, pressed = _pressed_on(message.id)
    async with lock:
        pressed.add(custom_id)
        view = pressed_view(message, pressed)
        if view is None:
            return
        try:
            await message.edit(view=view)
        except discord.HTTPException as exc:
            # Cosmetic only: the job was accepted and runs whatever the old message looks like.
            log.info("could not mark button %s as pressed: %s", custom_id, exc)


async def mark_pressed_at(client: discord.Client, where: dict[str, Any] | None) -> None:
    """Turn a button blue on a message the interaction does not carry (Yes to a question)."""
    if not where:
        return
    try:
        channel = client.get_partial_messageable(int(where["channel_id"]))
        message = await channel.fetch_message(int(where["message_id"]))
    except (discord.HTTPException, KeyError, ValueError) as exc:
        log.info("could not find a confirmed press's button: %s", exc)
        return
    await _turn_blue(message, str(where["custom_id"]))


async def mark_pressed(interaction: discord.Interaction[Any], *, custom_id: str | None = None) -> None:
    """Turn the pressed button blue on its message, like Midjourney's; the rest stays as it was.

    ``custom_id`` names the button when the interaction is not its press (a modal it opened).
    """
    message = interaction.message
    custom_id = custom_id or (interaction.data or {}).get("custom_id")
    if message is not None and isinstance(custom_id, str):
        await _turn_blue(message, custom_id)
