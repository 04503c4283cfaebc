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
from workers.schema import GenerationParams, JobKind

# The bold prompt line at most, escapes included. Discord refuses a message over MAX_CONTENT
# characters whole, result and all: the rest is room for whatever follows the line.
MAX_PROMPT_SHOWN = 1500
MAX_CONTENT = 2000
MAX_NOTES_SHOWN = 5
MAX_NOTE_LENGTH = 200


def cut_escaped(text: str, limit: int) -> str:
    """Markdown-escaped ``text`` cut to ``limit`` characters with an ellipsis, never mid-escape.

    A backslash left alone at the end would escape the ellipsis or the closing ``**`` after it.
    """
    if len(text) <= limit:
        return text
    cut = text[: max(0, limit - 1)]
    if (len(cut) - len(cut.rstrip("\\"))) % 2:
        cut = cut[:-1]
    return cut + "…"


def shown_prompt(job: Job) -> str:
    """The prompt as shown in a message: markdown-escaped, then bounded with the escapes counted."""
    return cut_escaped(discord.utils.escape_markdown(job.prompt or ""), MAX_PROMPT_SHOWN - len("****"))


def _capped_texts(params: GenerationParams, cap: int) -> GenerationParams:
    """``params`` with the prompt and the ``--no`` text each cut to ``cap`` characters (``…`` last)."""
    update = {
        name: text[: cap - 1] + "…" if cap > 0 else ""
        for name in ("prompt", "negative_prompt")
        if len(text := getattr(params, name)) > cap
    }
    return params.model_copy(update=update)


def prompt_line(job: Job) -> str:
    """``**a red fox --ar 3:2 --seed 7**``: the prompt as typed back, parameters and seed included.

    The line stays within ``MAX_PROMPT_SHOWN`` characters, escapes included: escaping can double
    the text (each ``_`` shows as ``\\_``) and ``--no`` has 1500 characters of its own, so both
    texts are cut to the longest common length whose line fits, parameters kept. A row whose
    stored parameters no longer validate shows its plain prompt.
    """
    try:
        params = generation_params(job)
    except ValueError:
        return f"**{shown_prompt(job)}**"
    line = parameter_line(params, job.seed)
    if len(line) > MAX_PROMPT_SHOWN:
        # A shorter cap never makes a longer line, so a binary search finds the longest that fits.
        low, high = 0, max(len(params.prompt), len(params.negative_prompt)) - 1
        while low < high:
            middle = (low + high + 1) // 2
            if len(parameter_line(_capped_texts(params, middle), job.seed)) <= MAX_PROMPT_SHOWN:
                low = middle
            else:
                high = middle - 1
        line = parameter_line(_capped_texts(params, low), job.seed)
    if len(line) > MAX_PROMPT_SHOWN:  # the rest is parameters (reference URLs): cut the line itself
        line = f"**{cut_escaped(line[2:-2], MAX_PROMPT_SHOWN - len('****'))}**"
    return line


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
    """The message carrying the result, with the engine's notes under it (those that fit)."""
    content = f"{job_head(job)} {mode_suffix(job)}"
    for line in note_lines(job_notes(job)):
        # Escaped notes may reach 400 characters each: one that would push the message past
        # Discord's limit is left out rather than have the result refused.
        if len(content) + 1 + len(line) > MAX_CONTENT:
            break
        content += "\n" + line
    return content


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
