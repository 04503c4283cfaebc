"""The fake Discord server, driven by a real discord.py ``commands.Bot``.

The bot below is deliberately tiny: ``/ping`` defers, then sends a followup with a PNG and a
persistent ``DynamicItem`` button whose custom_id carries state; ``/echo`` answers at once,
ephemerally. Each test starts its own fake on a free port.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import struct
import zlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import discord
import pytest
from discord import app_commands
from discord.ext import commands

try:  # pytest puts tests/ on sys.path (rootdir-relative "prepend" import mode)
    from fakes import FakeDiscord, FakeInteraction, RecordedRequest
except ImportError:  # imported as a package from the repository root
    from tests.fakes import FakeDiscord, FakeInteraction, RecordedRequest

TOKEN = "fake-bot-token"


def _png(width: int = 4, height: int = 2) -> bytes:
    """A valid, tiny RGB PNG (so the fake can report width and height)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\x10\x20\x30" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


PNG = _png()


class VaryButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]],
    template=r"mirage:vary:(?P<job>[0-9a-f]{8}):(?P<idx>[1-4])",
):
    """A persistent button: all its state (job id, image index) lives in the custom_id."""

    def __init__(self, job: str, idx: int) -> None:
        super().__init__(
            discord.ui.Button(
                label=f"V{idx}", style=discord.ButtonStyle.secondary, custom_id=f"mirage:vary:{job}:{idx}"
            )
        )
        self.job = job
        self.idx = idx

    @classmethod
    async def from_custom_id(
        cls,
        interaction: discord.Interaction[Any],
        item: discord.ui.Button[Any],
        match: re.Match[str],
    ) -> VaryButton:
        """Rebuild the button from its custom_id (works in a freshly started bot)."""
        return cls(match["job"], int(match["idx"]))

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        """Acknowledge, read the grid back from the CDN, then edit the message."""
        bot: MiniBot = interaction.client  # type: ignore[assignment]
        await interaction.response.defer()
        message = interaction.message
        assert message is not None
        data = await message.attachments[0].read()
        # Recorded before the edit so a test that saw the edit also sees the press.
        bot.presses.append((self.job, self.idx, data))
        await interaction.edit_original_response(
            content=f"vary {self.job} #{self.idx} by {interaction.user.id} ({len(data)} bytes)"
        )


class MiniBot(commands.Bot):
    """The smallest bot exercising what Mirage needs from Discord."""

    def __init__(self, *, guild_id: int | None = None) -> None:
        # guild_ready_timeout: discord.py otherwise waits 2 s after the last GUILD_CREATE.
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=discord.Intents.default(),
            guild_ready_timeout=0.05,
        )
        self.sync_guild = discord.Object(guild_id) if guild_id else None
        self.presses: list[tuple[str, int, bytes]] = []
        self.errors: list[discord.HTTPException] = []
        self.error_seen = asyncio.Event()
        self.filesize_limits: list[int] = []
        self.followup_gate: asyncio.Event | None = None
        self.echo_gate: asyncio.Event | None = None
        self.payload = PNG
        self.custom_id_suffix = ""

    async def setup_hook(self) -> None:
        """Register the persistent button and the commands, then sync."""
        self.add_dynamic_items(VaryButton)

        @app_commands.command(name="ping", description="Defer, then answer with a grid")
        async def ping(interaction: discord.Interaction[Any], prompt: str = "hello") -> None:
            self.filesize_limits.append(interaction.filesize_limit)
            await interaction.response.defer(thinking=True)
            if self.followup_gate is not None:
                await self.followup_gate.wait()
            view = discord.ui.View(timeout=None)
            view.add_item(VaryButton("0badcafe", 1))
            if self.custom_id_suffix:
                view.add_item(
                    discord.ui.Button(label="bad", custom_id="x" * 90 + self.custom_id_suffix)  # type: ignore[arg-type]
                )
            try:
                await interaction.followup.send(
                    content=f"**{prompt}**",
                    file=discord.File(io.BytesIO(self.payload), "grid.png"),
                    view=view,
                )
            except discord.HTTPException as exc:
                self.errors.append(exc)
                self.error_seen.set()

        @app_commands.command(name="echo", description="Answer at once, ephemerally")
        async def echo(interaction: discord.Interaction[Any], text: str, times: int = 1) -> None:
            if self.echo_gate is not None:
                await self.echo_gate.wait()
            try:
                await interaction.response.send_message(" ".join([text] * times), ephemeral=True)
            except discord.HTTPException as exc:
                self.errors.append(exc)
                self.error_seen.set()

        for command in (ping, echo):
            self.tree.add_command(command, guild=self.sync_guild)
        await self.tree.sync(guild=self.sync_guild)


@contextlib.asynccontextmanager
async def running(bot: MiniBot) -> AsyncIterator[MiniBot]:
    """Start ``bot`` against the installed fake; close it (cleanly) afterwards."""
    task = asyncio.create_task(bot.start(TOKEN))
    ready = asyncio.create_task(bot.wait_until_ready())
    done, _ = await asyncio.wait({task, ready}, timeout=5, return_when=asyncio.FIRST_COMPLETED)
    if ready not in done:
        ready.cancel()
        if task in done:
            task.result()  # surface the login/connect error
        raise TimeoutError("bot did not become ready")
    try:
        yield bot
    finally:
        await bot.close()
        await asyncio.wait_for(task, 5)


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    """A started and installed fake Discord."""
    async with FakeDiscord(token=TOKEN) as server:
        yield server


async def _ping_message(fake: FakeDiscord, bot: MiniBot) -> tuple[FakeInteraction, dict[str, Any]]:
    inter = await fake.slash("ping", {"prompt": "a red fox"})
    message = await inter.wait_original(lambda m: bool(m["components"]))
    return inter, message


async def test_login_ready_and_command_sync(fake: FakeDiscord) -> None:
    async with running(MiniBot()) as bot:
        assert bot.user is not None and bot.user.id == fake.bot_user.id
        assert bot.application_id == fake.application_id
        guild = bot.get_guild(fake.guild.id)
        assert guild is not None and guild.get_channel(fake.channel.id) is not None
        assert guild.me is not None

        paths = [(r.method, r.path) for r in fake.requests]
        assert ("GET", "/users/@me") in paths
        assert ("GET", "/oauth2/applications/@me") in paths
        put = await fake.wait_for_request(lambda r: r.route == "put_commands")
        assert put.method == "PUT" and put.path == f"/applications/{fake.application_id}/commands"
        assert put.headers["Authorization"] == f"Bot {TOKEN}"
        assert {c["name"] for c in fake.commands()} == {"ping", "echo"}
        assert all(int(c["id"]) > 0 for c in put.response)

        identify = next(p for p in fake.gateway_received if p["op"] == 2)
        assert identify["d"]["token"] == TOKEN
        assert fake.identify_count == 1


async def test_slash_defer_then_followup_with_file_and_button(fake: FakeDiscord) -> None:
    async with running(MiniBot()) as bot:
        inter = await fake.slash("ping", {"prompt": "a red fox"}, user=fake.user)

        callback = await inter.callback()
        assert callback.status == 200
        assert callback.callback_type == 5
        assert callback.query == {"with_response": "1"}

        [followup] = await inter.followups()
        assert followup.status == 200
        [upload] = followup.files
        assert (upload.filename, upload.data) == ("grid.png", PNG)
        assert upload.content_type == "application/octet-stream"  # discord.py's choice
        assert followup.json["content"] == "**a red fox**"
        assert followup.custom_ids() == ["mirage:vary:0badcafe:1"]

        # The first followup after a deferred response replaced the "thinking…" message.
        message = await inter.wait_original(lambda m: bool(m["components"]))
        assert message["id"] == followup.response["id"]
        assert message["flags"] & 128 == 0
        [attachment] = message["attachments"]
        assert attachment["content_type"] == "image/png"
        assert (attachment["width"], attachment["height"]) == (4, 2)
        async with aiohttp.ClientSession() as http, http.get(attachment["url"]) as resp:
            assert await resp.read() == PNG
        assert bot.filesize_limits == [fake.attachment_size_limit]


async def test_echo_is_ephemeral_and_second_callback_is_rejected(fake: FakeDiscord) -> None:
    async with running(MiniBot()):
        inter = await fake.slash("echo", {"text": "hi", "times": 2})
        callback = await inter.callback()
        assert callback.callback_type == 4
        assert callback.message_payload["content"] == "hi hi"
        assert callback.message_payload["flags"] & 64
        original = inter.original_message()
        assert original is not None and original["flags"] & 64
        assert callback.response["resource"]["message"]["id"] == original["id"]

        url = f"{fake.api_base}/interactions/{inter.id}/{inter.token}/callback"
        async with aiohttp.ClientSession() as http, http.post(url, json={"type": 4, "data": {}}) as resp:
            assert resp.status == 400
            assert resp.headers["Content-Type"] == "application/json"
            assert (await resp.json())["code"] == 40060


async def test_press_dynamic_item_acks_and_edits(fake: FakeDiscord) -> None:
    async with running(MiniBot()) as bot:
        _, message = await _ping_message(fake, bot)
        press = await fake.press("mirage:vary:0badcafe:1", message, user=fake.user)
        callback = await press.callback()
        assert callback.callback_type == 6
        [edit] = await press.edits()
        assert edit.path.endswith("/messages/@original")
        edited = await fake.wait_for_message(
            lambda m: m["id"] == message["id"] and m["content"].startswith("vary")
        )
        assert edited["content"] == f"vary 0badcafe #1 by {fake.user.id} ({len(PNG)} bytes)"
        assert edited["attachments"] == message["attachments"]  # not mentioned in the edit: kept
        assert bot.presses == [("0badcafe", 1, PNG)]


async def test_restarted_bot_still_handles_the_button(fake: FakeDiscord) -> None:
    async with running(MiniBot()) as first:
        _, message = await _ping_message(fake, first)
    fake.clear_requests()

    async with running(MiniBot()) as second:
        assert fake.identify_count == 2
        press = await fake.press("mirage:vary:0badcafe:1", message)
        assert (await press.callback()).callback_type == 6
        await press.edits()
        assert second.presses and second.presses[0][:2] == ("0badcafe", 1)
        assert first.presses == []


async def test_followup_with_expired_token_fails_with_50027(fake: FakeDiscord) -> None:
    bot = MiniBot()
    bot.followup_gate = asyncio.Event()
    async with running(bot):
        inter = await fake.slash("ping")
        assert (await inter.callback()).callback_type == 5
        fake.expire_token(inter)
        bot.followup_gate.set()
        [followup] = await inter.followups()
        assert followup.status == 401
        await asyncio.wait_for(bot.error_seen.wait(), 5)
        [error] = bot.errors
        assert error.status == 401 and error.code == 50027


async def test_guild_synced_commands_and_options_are_typed(fake: FakeDiscord) -> None:
    async with running(MiniBot(guild_id=fake.guild.id)):
        assert fake.commands() == []
        assert {c["name"] for c in fake.commands(fake.guild)} == {"ping", "echo"}
        inter = await fake.slash("echo", {"text": "yo", "times": 3})
        assert inter.payload["data"]["guild_id"] == str(fake.guild.id)
        assert (await inter.callback()).message_payload["content"] == "yo yo yo"


async def test_rate_limit_is_retried_and_oversized_files_are_rejected() -> None:
    async with FakeDiscord(token=TOKEN, attachment_size_limit=1024) as fake, running(MiniBot()) as bot:
        rule = fake.fail_next("POST", r"^/webhooks/", 429, retry_after=0.01)
        inter = await fake.slash("ping")
        followups = await inter.followups(count=2)
        assert [r.status for r in followups] == [429, 200]
        assert rule.hits == 1

        bot.payload = b"\0" * 2048
        inter = await fake.slash("ping")
        [too_big] = await inter.followups()
        assert too_big.status == 413
        await asyncio.wait_for(bot.error_seen.wait(), 5)
        [error] = bot.errors
        assert (error.status, error.code) == (413, 40005)
        assert bot.filesize_limits == [1024, 1024]


async def test_invalid_custom_id_is_rejected_like_discord(fake: FakeDiscord) -> None:
    bot = MiniBot()
    bot.custom_id_suffix = "y" * 20  # 110 characters: discord.py sends it, Discord refuses it
    async with running(bot):
        inter = await fake.slash("ping")
        [followup] = await inter.followups()
        assert followup.status == 400
        assert followup.response["code"] == 50035
        await asyncio.wait_for(bot.error_seen.wait(), 5)
        assert bot.errors[0].code == 50035


async def test_gateway_resume_after_dropped_connection(fake: FakeDiscord) -> None:
    async with running(MiniBot()):
        await fake.drop_connections()
        # discord.py resumes at READY's resume_gateway_url; interactions keep flowing.
        inter = await fake.slash("echo", {"text": "back"})
        assert (await inter.callback()).message_payload["content"] == "back"
        assert fake.resume_count == 1
        assert fake.identify_count == 1


async def test_unknown_route_and_request_recording(fake: FakeDiscord) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{fake.api_base}/nope", headers={"Authorization": f"Bot {TOKEN}"}) as resp:
            assert resp.status == 404
        async with http.get(f"{fake.api_base}/users/@me", headers={"Authorization": "Bot wrong"}) as resp:
            assert resp.status == 401
    recorded: RecordedRequest = await fake.wait_for_request(lambda r: r.path == "/nope")
    assert recorded.status == 404 and recorded.method == "GET"
    assert discord.http.Route.BASE == fake.api_base
    discord.http._set_api_version(10)  # would reset the base to discord.com without install()
    assert discord.http.Route.BASE == fake.api_base


async def test_late_callback_is_unknown_interaction(fake: FakeDiscord) -> None:
    bot = MiniBot()
    bot.echo_gate = asyncio.Event()
    async with running(bot):
        inter = await fake.slash("echo", {"text": "late"})
        fake.advance_clock(3.5)  # past Discord's 3 s window, without sleeping
        bot.echo_gate.set()
        callback = await inter.callback()
        assert callback.status == 404 and callback.response["code"] == 10062
        await asyncio.wait_for(bot.error_seen.wait(), 5)
        assert isinstance(bot.errors[0], discord.NotFound)


class RemixButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=r"remix:(?P<job>\w+)"):
    """Opens a modal; its submission edits the message in place (callback type 7)."""

    def __init__(self, job: str) -> None:
        super().__init__(discord.ui.Button(label="Remix", custom_id=f"remix:{job}"))
        self.job = job

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction[Any], item: discord.ui.Button[Any], match: re.Match[str]
    ) -> RemixButton:
        """Rebuild from the custom_id."""
        return cls(match["job"])

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        """Ask for a new prompt."""
        await interaction.response.send_modal(RemixModal(self.job))


class RemixModal(discord.ui.Modal, title="Remix"):
    """The remix prompt form."""

    prompt: discord.ui.TextInput[RemixModal] = discord.ui.TextInput(label="Prompt", custom_id="remix:prompt")

    def __init__(self, job: str) -> None:
        super().__init__(custom_id=f"remix-modal:{job}")

    async def on_submit(self, interaction: discord.Interaction[Any]) -> None:
        """Edit the message carrying the button."""
        await interaction.response.edit_message(content=f"remix: {self.prompt.value}", view=None)


class ExtrasBot(commands.Bot):
    """Exercises resolved options, channel and DM messages, modals."""

    def __init__(self) -> None:
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=discord.Intents.default(),
            guild_ready_timeout=0.05,
        )
        self.seen: list[tuple[Any, ...]] = []

    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        """No wait: discord.py's default sleeps 5 s before every re-IDENTIFY (after op 9)."""

    async def setup_hook(self) -> None:
        """Register /describe and the remix button."""
        self.add_dynamic_items(RemixButton)

        @app_commands.command(name="describe", description="Options of every resolved kind")
        async def describe(
            interaction: discord.Interaction[Any],
            who: discord.Member,
            image: discord.Attachment,
            where: discord.TextChannel,
            role: discord.Role,
            strength: float = 0.5,
        ) -> None:
            data = await image.read()
            self.seen.append((who.id, who.display_name, image.filename, data, where.id, role.id, strength))
            view = discord.ui.View(timeout=None)
            view.add_item(RemixButton("job1"))
            await interaction.response.send_message("described", view=view)
            channel = self.get_channel(where.id)
            assert isinstance(channel, discord.TextChannel)
            posted = await channel.send("public copy", file=discord.File(io.BytesIO(data), "copy.png"))
            await posted.edit(content="public copy (edited)")
            await who.send("your description is ready")

        @app_commands.command(name="whereami", description="Reply with the context")
        async def whereami(interaction: discord.Interaction[Any]) -> None:
            await interaction.response.send_message(f"guild={interaction.guild_id}")

        self.tree.add_command(describe)
        self.tree.add_command(whereami)
        await self.tree.sync()


async def test_resolved_options_channel_and_dm_messages_and_modal(fake: FakeDiscord) -> None:
    bob = fake.add_user("bob", global_name="Bob")
    fake.add_member(fake.guild, bob, nick="bobby")
    role = fake.add_role(fake.guild, "Artists", permissions=1 << 11)
    image = fake.upload_attachment("in.png", PNG)
    async with running(ExtrasBot()) as bot:  # type: ignore[arg-type]
        inter = await fake.slash(
            "describe", {"who": bob, "image": image, "where": fake.channel, "role": role, "strength": 1}
        )
        assert inter.payload["data"]["options"][-1] == {"name": "strength", "type": 10, "value": 1}
        assert (await inter.callback()).callback_type == 4
        assert bot.seen == [(bob.id, "bobby", "in.png", PNG, fake.channel.id, role.id, 1.0)]

        dm = await fake.wait_for_message(lambda m: m["content"] == "your description is ready")
        assert "guild_id" not in dm and fake.dm_channels[bob.id].id == int(dm["channel_id"])
        public = await fake.wait_for_message(lambda m: m["content"] == "public copy (edited)")
        assert public["attachments"][0]["filename"] == "copy.png" and "webhook_id" not in public

        message = await inter.wait_original()
        opened = await fake.press("remix:job1", message, user=bob)
        assert (await opened.callback()).callback_type == 9
        assert opened.modal is not None and opened.modal["custom_id"] == "remix-modal:job1"
        submitted = await fake.submit_modal(
            "remix-modal:job1", {"remix:prompt": "a blue fox"}, user=bob, message=message
        )
        assert (await submitted.callback()).callback_type == 7
        edited = fake.get_message(message["id"])
        assert edited is not None and edited["content"] == "remix: a blue fox" and edited["components"] == []

        with pytest.raises(ValueError, match="no component"):
            await fake.press("remix:job1", edited)


async def test_dm_interaction_and_gateway_reconnects(fake: FakeDiscord) -> None:
    async with running(ExtrasBot()):  # type: ignore[arg-type]
        inter = await fake.slash("whereami", dm=True)
        assert (await inter.callback()).message_payload["content"] == "guild=None"

        await fake.request_reconnect()  # op 7: discord.py resumes
        inter = await fake.slash("whereami")
        assert (await inter.callback()).message_payload["content"] == f"guild={fake.guild.id}"
        assert (fake.identify_count, fake.resume_count) == (1, 1)

        await fake.invalidate_sessions()  # op 9 (not resumable): discord.py identifies again
        inter = await fake.slash("whereami")
        assert (await inter.callback()).status == 200
        assert fake.identify_count == 2
