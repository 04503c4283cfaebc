"""Custom Zoom: a form with the prompt and ``--zoom``, as Midjourney's, making a ZOOM job.

The button (``mj:cz:<id>``, on single images) opens a modal holding the image's prompt as the
member would type it, with ``--ar`` and ``--zoom 2`` at the end. The member may edit the words,
set ``--zoom`` from 1 to 2 and change ``--ar``: a new aspect ratio outpaints the image to the new
shape (with ``--zoom 1`` only the shape changes). The rest is read by the prompt parser, so its
messages explain any mistake. The job is a ZOOM follow-up of the image with the edited
parameters, accepted like every other press.

The modal's custom_id names the job and the member (``mj:czm:<id>:<user>``): discord.py keeps
open modals by custom_id alone, so two members zooming the same image get separate forms. The
submit is handled from that id and the form's text (:func:`form_submitted`, routed by
``bot.buttons.on_modal_submit``), not by the modal object, which a bot restart forgets.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import discord
from discord import ui

from bot.buttons import JOB_ID_CHARS, load_source, mark_pressed, on_modal_submit
from bot.dynamic_button import JobIdButton
from bot.interactions import refuse
from bot.models import Job
from bot.operations import Operation, generation_params
from bot.prompt import PARAMETER_MARKER, parse_prompt, prompt_text
from bot.prompt_errors import PromptError
from bot.remix import submitted_text
from bot.styles import StylePreset
from workers.schema import GenerationParams, JobKind

if TYPE_CHECKING:
    from bot.client import MirageBot

MIN_ZOOM, MAX_ZOOM, DEFAULT_ZOOM = 1.0, 2.0, 2.0
MODAL_TIMEOUT_S = 900.0  # discord.py drops the form object then; its submit is still routed by id
MAX_FORM_CHARS = 4000  # Discord's limit for a text input
# "--zoom", or the dash a phone makes of "--" (the prompt parser reads both the same way).
_ZOOM_RE = re.compile(rf"(?:^|\s)(?:{PARAMETER_MARKER})zoom(?:\s+(\S+))?(?=\s|$)", re.IGNORECASE)
_AR_RE = re.compile(r"(?:^|\s)--(?:ar|aspect)\s", re.IGNORECASE)
MODAL_ID = rf"mj:czm:(?P<id>{JOB_ID_CHARS}):(?P<user>[0-9]+)"  # the user it was opened for
FIELD_ID = "prompt"
FORM_BUSY = "The database was slow to answer; press Custom Zoom again."
NO_ZOOM = "Add `--zoom` with a value from 1 to 2 (for example `--zoom 1.5`)."
NOTHING_TO_DO = "With `--zoom 1` the image only changes when `--ar` gives it a new shape."


class CustomZoomError(ValueError):
    """A form the member must fix; ``str()`` says how."""


def form_text(params: GenerationParams) -> str:
    """The form's starting text: the prompt as typed, its ``--ar``, and ``--zoom 2``."""
    text = prompt_text(params)
    if not _AR_RE.search(f" {text} "):
        text += f" --ar {params.aspect[0]}:{params.aspect[1]}"
    return f"{text} --zoom {DEFAULT_ZOOM:g}".strip()[:MAX_FORM_CHARS]


def read_form(
    text: str, current: GenerationParams, styles: Mapping[str, StylePreset] | None = None
) -> tuple[float, GenerationParams]:
    """The zoom factor and the parameters a submitted form asks for (``styles``: the presets).

    Raises :class:`CustomZoomError` for a missing, repeated or out-of-range ``--zoom``, a prompt
    the parser refuses, or a form that would change nothing.
    """
    matches = list(_ZOOM_RE.finditer(text))
    if not matches:
        raise CustomZoomError(NO_ZOOM)
    if len(matches) > 1:
        raise CustomZoomError("Use `--zoom` once.")
    raw = matches[0].group(1)
    try:
        zoom = float(raw) if raw is not None else float("nan")
    except ValueError:
        zoom = float("nan")
    if not MIN_ZOOM <= zoom <= MAX_ZOOM:  # NaN fails too
        shown = f" (you wrote `{discord.utils.escape_markdown(raw[:20])}`)" if raw else ""
        raise CustomZoomError(f"`--zoom` must be a number from 1 to 2{shown}.")
    rest = (text[: matches[0].start()] + " " + text[matches[0].end() :]).strip()
    try:
        params = parse_prompt(rest, styles=styles)
    except PromptError as exc:
        raise CustomZoomError(str(exc)) from None
    if zoom == MIN_ZOOM and params.aspect == current.aspect:
        raise CustomZoomError(NOTHING_TO_DO)
    return zoom, params


class CustomZoomModal(ui.Modal):
    """The form: one text box with the prompt, ``--ar`` and ``--zoom``.

    It only shows the form: the submit is handled from its ``custom_id`` (:func:`form_submitted`).
    """

    def __init__(self, job: Job, user_id: int) -> None:
        super().__init__(title="Custom Zoom", custom_id=f"mj:czm:{job.id}:{user_id}", timeout=MODAL_TIMEOUT_S)
        self.prompt: ui.TextInput[CustomZoomModal] = ui.TextInput(
            label="Prompt, --ar and --zoom (1 to 2)",
            style=discord.TextStyle.paragraph,
            default=form_text(generation_params(job)),
            max_length=MAX_FORM_CHARS,
            custom_id=FIELD_ID,
        )
        self.add_item(self.prompt)


async def form_submitted(interaction: discord.Interaction[Any], match: re.Match[str]) -> None:
    """Check a submitted form, then accept the ZOOM job and mark the button pressed."""
    parent = await load_source(interaction, match["id"])  # it may be gone or hidden by now
    if parent is None:
        return
    bot: MirageBot = interaction.client  # type: ignore[assignment]
    text = submitted_text(interaction, FIELD_ID) or ""
    try:
        zoom, params = read_form(text, generation_params(parent), styles=bot.jobs.prompting.presets)
    except CustomZoomError as exc:
        await refuse(interaction, str(exc))
        return
    operation = Operation(JobKind.ZOOM, scale=zoom)
    if await bot.flow.press(interaction, parent, operation, params=params) is not None:
        await mark_pressed(interaction, custom_id=f"mj:cz:{parent.id}")


on_modal_submit(MODAL_ID, "mj:cz:{id}", form_submitted)


class CustomZoomButton(JobIdButton, prefix="cz", label="Custom Zoom", emoji="🔍"):
    """``Custom Zoom``: opens the form for the presser."""

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        """Open the form (a modal must be the press's first answer)."""
        job = await load_source(interaction, self.job_id)
        if job is None:
            return
        if interaction.response.is_done():
            # The lookup outlasted its budget and the press was deferred: a modal can no
            # longer be opened for it.
            await refuse(interaction, FORM_BUSY)
            return
        await interaction.response.send_modal(CustomZoomModal(job, interaction.user.id))
