"""Sending a job's messages to Discord: the interaction token first, then the channel.

Messages go to the interaction's original response (the deferred "thinking…" message) with the
interaction token while it is alive; after its 15 minutes, or when Discord says it is gone
(10062 unknown interaction, 50027 invalid webhook token), final messages go to the channel with
the bot token, mentioning the member. An attachment over the upload limit is re-encoded smaller,
never dropped: the only place the bot encodes a result again, and only when it must.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
from datetime import timedelta
from typing import Any

import aiohttp
import discord
from discord.http import handle_message_parameters
from discord.utils import MISSING
from discord.webhook.async_ import async_context
from PIL import Image as PILImage

from bot.content_rules import spoiler_filename
from bot.models import Job, utcnow
from bot.render import MAX_CONTENT, allowed_mentions_for, cut_escaped, file_stem
from workers.imaging import decode_image, encode_under

log = logging.getLogger(__name__)

TOKEN_LIFETIME = timedelta(minutes=15)
# Stop using the interaction token a little before Discord does: an edit in flight at 15:00
# would fail anyway and cost a round trip before the channel fallback.
TOKEN_MARGIN = timedelta(seconds=30)
DEFAULT_FILESIZE_LIMIT = 10 * 1024 * 1024
# Discord error codes that mean "this interaction/webhook can no longer be used".
DEAD_TOKEN_CODES = frozenset({10062, 50027, 10015, 10008})
TOO_LARGE_CODE = 40005
MAX_SEND_ATTEMPTS = 8
MIN_ATTACHMENT_BYTES = 1024
PREVIEW_SIDE = 256


class DiscordError(Exception):
    """Sending failed in a way worth retrying later (Discord down, rate limited hard)."""


def token_alive(job: Job) -> bool:
    """Whether the job's interaction token can still edit its message."""
    if not job.interaction_token or not job.application_id or job.created_at is None:
        return False
    return utcnow() - job.created_at < TOKEN_LIFETIME - TOKEN_MARGIN


def fit(data: bytes, limit: int, ext: str) -> tuple[bytes, str]:
    """The stored bytes if they fit the upload limit, else a re-encoded smaller version."""
    if len(data) <= limit:
        return data, ext
    return encode_under(decode_image(data), limit)


def preview_jpeg(preview_b64: str, limit: int) -> bytes | None:
    """A small JPEG of the worker's preview, or None if it is unreadable or cannot fit ``limit``.

    The preview is a courtesy: it is shrunk to at most PREVIEW_SIDE pixels and simply left out
    rather than re-encoded at length when the upload limit is tiny.
    """
    try:
        raw = base64.b64decode(preview_b64, validate=True)
        with PILImage.open(io.BytesIO(raw)) as img:
            img.load()
            small = img.convert("RGB")
        small.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
        out = io.BytesIO()
        small.save(out, "JPEG", quality=60)
    except Exception:
        return None
    data = out.getvalue()
    return data if len(data) <= limit else None


class Sender:
    """Edits a job's interaction message or posts to its channel; holds the webhook HTTP session."""

    def __init__(self, bot: discord.Client) -> None:
        self.bot = bot
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        """Close the HTTP session used for interaction-token edits."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send_final(
        self,
        job: Job,
        *,
        content: str,
        image: tuple[bytes, str] | None,
        view: discord.ui.View | None,
        limit: int = DEFAULT_FILESIZE_LIMIT,
        spoiler: bool = False,
    ) -> int | None:
        """Final message: edit the original response, else post to the channel with a mention.

        Attachments larger than the limit are re-encoded; a 40005 "too large" answer halves the
        limit and tries again, so an image is never dropped. Content over Discord's 2000
        characters is cut, not refused. ``spoiler`` sends the image as ``SPOILER_<name>``, which
        Discord blurs until clicked.
        """
        if len(content) > MAX_CONTENT:
            # Discord refuses the whole message, result included, on every retry: cut it instead.
            log.warning("message of job %s is %d characters; cut to %d", job.id, len(content), MAX_CONTENT)
            content = cut_escaped(content, MAX_CONTENT)
        use_token = token_alive(job)
        use_dm = False
        sent_size = 0
        for _attempt in range(MAX_SEND_ATTEMPTS):
            files: list[discord.File] = []
            if image is not None:
                data, ext = await asyncio.to_thread(fit, image[0], limit, image[1])
                sent_size = len(data)
                name = f"{file_stem(job)}.{ext}"
                files = [discord.File(io.BytesIO(data), filename=spoiler_filename(name) if spoiler else name)]
            try:
                if use_token:
                    return await self.edit_original(job, content=content, files=files, view=view)
                return await self.send_channel(job, content=content, files=files, view=view, dm=use_dm)
            except discord.HTTPException as exc:
                if (exc.code == TOO_LARGE_CODE or exc.status == 413) and image is not None:
                    # The real limit is below what we sent (a restart forgot the interaction's
                    # limit, or the server's changed): aim at half of the rejected size.
                    limit = max(MIN_ATTACHMENT_BYTES, min(limit, sent_size) // 2)
                    log.info("attachment for %s too large; re-encoding under %d bytes", job.id, limit)
                    continue
                if use_token and (exc.code in DEAD_TOKEN_CODES or exc.status in (401, 404)):
                    log.info("interaction token of %s is gone (%s); posting to the channel", job.id, exc.code)
                    use_token = False
                    continue
                if not use_token and not use_dm and job.guild_id and exc.status in (403, 404):
                    # The channel is gone or closed to the bot (deleted, permissions taken away,
                    # thread archived): retrying it for a day would deliver nothing.
                    log.info("channel of %s refuses the result (%s); sending it by DM", job.id, exc.code)
                    use_dm = True
                    continue
                raise
        raise DiscordError(f"could not deliver job {job.id}")

    async def edit_original(
        self,
        job: Job,
        *,
        content: str,
        files: list[discord.File],
        view: discord.ui.View | None,
    ) -> int:
        """PATCH the job's interaction message (the original response, or its own follow-up).

        Goes through discord.py's webhook adapter (rate limits and multipart included); the bot
        keeps no Interaction object across restarts, only the application id and token.
        """
        assert job.application_id is not None and job.interaction_token is not None
        if self._session is None:
            self._session = aiohttp.ClientSession()
        with handle_message_parameters(
            content=content,
            attachments=files,
            view=view,
            allowed_mentions=allowed_mentions_for(job),
        ) as params:
            adapter = async_context.get()
            sent: dict[str, Any] = {
                "session": self._session,
                "payload": params.payload,
                "multipart": params.multipart,
                "files": params.files,
            }
            data: Any
            if job.reply_message_id:
                data = await adapter.edit_webhook_message(
                    job.application_id, job.interaction_token, job.reply_message_id, **sent
                )
            else:
                data = await adapter.edit_original_interaction_response(
                    job.application_id, job.interaction_token, **sent
                )
        return int(data["id"]) if isinstance(data, dict) and "id" in data else 0

    async def send_channel(
        self,
        job: Job,
        *,
        content: str,
        files: list[discord.File],
        view: discord.ui.View | None,
        dm: bool = False,
    ) -> int:
        """POST the message to the job's channel with the bot token, mentioning the member.

        ``dm``: to the member's DMs instead, for a channel that no longer takes the bot's posts.
        """
        if dm:
            channel: discord.abc.Messageable = await self.bot.create_dm(discord.Object(id=job.user_id))
        else:
            channel = self.bot.get_partial_messageable(job.channel_id, guild_id=job.guild_id or None)
            if f"<@{job.user_id}>" not in content:
                content = cut_escaped(f"<@{job.user_id}> {content}", MAX_CONTENT)
        message = await channel.send(
            content=content,
            files=files or MISSING,
            view=view if view is not None else MISSING,
            allowed_mentions=discord.AllowedMentions.none() if dm else allowed_mentions_for(job),
        )
        return message.id
