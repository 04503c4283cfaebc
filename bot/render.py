"""What the bot's messages about a job say: pure functions of the job row, no Discord I/O.

Midjourney's shape: the first line is the normalised prompt with its parameters and seed,
``**a red fox --ar 3:2 --seed 7** - <what> by <@member> (fast)``; ``(Waiting to start)`` before a
worker takes it, ``(40%) (fast)`` while it runs (the speed class: fast, relax or turbo, with
``stealth`` beside it for stealth jobs), the engine's notes under a result as small ``-#`` lines,
and for a failure the
fixed sentence of its failure kind (``bot.failure_messages``) and the refund.
"""

from __future__ import annotations

import re

import discord

from bot.failure_messages import failure_message
from bot.models import Job
from bot.operations import Operation, generation_params, job_notes
from bot.prompt import parameter_line
from bot.speed import speed_of
from workers.schema import JobKind

MAX_PROMPT_SHOWN = 1500
MAX_NOTES_SHOWN = 5
MAX_NOTE_LENGTH = 200


def shown_prompt(job: Job) -> str:
    """The prompt as shown in a message: markdown-escaped and bounded."""
    text = job.prompt or ""
    if len(text) > MAX_PROMPT_SHOWN:
        text = text[: MAX_PROMPT_SHOWN - 1] + "…"
    return discord.utils.escape_markdown(text)


def prompt_line(job: Job) -> str:
    """``**a red fox --ar 3:2 --seed 7**``: the prompt as typed back, parameters and seed included.

    The prompt text is bounded first so the line stays within a message; a row whose stored
    parameters no longer validate shows its plain prompt.
    """
    try:
        params = generation_params(job)
    except ValueError:
        return f"**{shown_prompt(job)}**"
    if len(params.prompt) > MAX_PROMPT_SHOWN:
        params = params.model_copy(update={"prompt": params.prompt[: MAX_PROMPT_SHOWN - 1] + "…"})
    return parameter_line(params, job.seed)


def operation_label(job: Job) -> str:
    """What a follow-up job did, as Midjourney names it ("Variations (Strong)", "Pan Left")."""
    kind = JobKind(job.kind)
    op = Operation.from_job(job)
    if kind == JobKind.VARIATION:
        return "Variations (Subtle)" if (op.strength or 0.85) < 0.7 else "Variations (Strong)"
    if kind == JobKind.UPSCALE:
        return "Upscaled (Subtle)" if (op.strength or 0.35) < 0.45 else "Upscaled (Creative)"
    if kind == JobKind.ZOOM:
        return f"Zoom Out {op.scale:g}x" if op.scale else "Zoom Out"
    if kind == JobKind.PAN:
        return f"Pan {op.direction.value.capitalize()}" if op.direction else "Pan"
    if kind == JobKind.REGION:
        return "Vary (Region)"
    return "Make Square"


COMMAND_TITLES = {JobKind.DESCRIBE: "Describe", JobKind.BLEND: "Blend"}


def job_head(job: Job) -> str:
    """``**prompt --params --seed N** - <what> by <@user>`` like Midjourney's messages."""
    kind = JobKind(job.kind)
    mention = f"<@{job.user_id}>"
    if kind in COMMAND_TITLES:
        # /describe and /blend start from pictures, not from a prompt to type back.
        return f"**{COMMAND_TITLES[kind]}** - {mention}"
    prompt = prompt_line(job)
    if kind in (JobKind.IMAGINE, JobKind.REROLL):
        return f"{prompt} - {mention}"
    if kind == JobKind.CROP:
        return f"{prompt} - Image #{job.parent_index or 1} {mention}"
    return f"{prompt} - {operation_label(job)} by {mention}"


def mode_suffix(job: Job) -> str:
    """``(fast)``, ``(relax)`` or ``(turbo)``; ``(fast, stealth)`` for a stealth job."""
    stealth = ", stealth" if job.visibility == "stealth" else ""
    return f"({speed_of(job)}{stealth})"


def waiting_content(job: Job, position: int) -> str:
    """The message while a job waits for a worker; its place in line when others are ahead."""
    head = f"{job_head(job)} (Waiting to start)"
    return head if position <= 1 else f"{head}\n-# Position {position} in line"


def progress_content(job: Job, percent: int) -> str:
    """The message while a job runs."""
    return f"{job_head(job)} ({percent}%) {mode_suffix(job)}"


def note_lines(notes: list[str]) -> list[str]:
    """The engine's notes as Discord subtext lines (``-# …``), escaped, bounded and one line each."""
    lines = []
    for note in notes[:MAX_NOTES_SHOWN]:
        text = " ".join(note.split())
        if len(text) > MAX_NOTE_LENGTH:
            text = text[: MAX_NOTE_LENGTH - 1] + "…"
        if text:
            lines.append(f"-# {discord.utils.escape_markdown(discord.utils.escape_mentions(text))}")
    return lines


def final_content(job: Job) -> str:
    """The message carrying the result, with the engine's notes under it."""
    return "\n".join([f"{job_head(job)} {mode_suffix(job)}", *note_lines(job_notes(job))])


def failure_content(job: Job, *, openai_configured: bool = False) -> str:
    """The message for a failed job: one fixed sentence for its failure kind, and the refund.

    The worker's own text (``job.error``) is never shown: it may name files, devices or an
    API's wording, so it goes to the logs only. ``openai_configured`` says whether the OpenAI
    engine may be suggested after an SDXL failure (``bot.failure_messages``).
    """
    reason = failure_message(job.error_code, engine=job.engine, openai_configured=openai_configured)
    lines = [f"{job_head(job)} ❌ {reason}"]
    if job.cost:
        plural = job.cost != 1
        lines.append(f"Your {job.cost} credit{'s' if plural else ''} {'were' if plural else 'was'} refunded.")
    return "\n".join(lines)


def file_stem(job: Job) -> str:
    """A readable, safe file name stem: a few prompt words and the job id."""
    words = re.findall(r"[a-z0-9]+", (job.prompt or "").lower())
    slug = "_".join(words)[:40].strip("_") or "mirage"
    return f"{slug}_{job.id}"


def allowed_mentions_for(job: Job) -> discord.AllowedMentions:
    """Only the job's owner may be pinged, never roles or @everyone from a prompt."""
    return discord.AllowedMentions(everyone=False, roles=False, users=[discord.Object(job.user_id)])
