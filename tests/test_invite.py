"""The newcomer's path: the invite link, the permissions it asks for, and hidden admin commands."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import discord
import pytest
from discord import app_commands

from bot.__main__ import main
from bot.cogs.account import Account
from bot.cogs.admin import Admin
from bot.cogs.imagine import Imagine
from bot.invite import BadToken, bot_permissions, client_id_from_token, invite_url
from bot.settings import get_settings

CLIENT_ID = 1_234_567_890_123_456_789


@pytest.fixture(autouse=True)
def fresh_settings() -> Iterator[None]:
    """``main`` reads the process-wide settings once; each test sets its own environment."""
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def token_for(client_id: int) -> str:
    """A token shaped like Discord's: base64 id, timestamp, HMAC (the last two unchecked here)."""
    head = base64.urlsafe_b64encode(str(client_id).encode()).decode().rstrip("=")
    return f"{head}.GhY2ab.{'x' * 38}"


def test_invite_url_asks_for_both_scopes_and_exactly_the_needed_permissions() -> None:
    query = parse_qs(urlsplit(invite_url(CLIENT_ID)).query)
    assert query["client_id"] == [str(CLIENT_ID)]
    assert query["scope"] == ["bot applications.commands"]
    granted = discord.Permissions(int(query["permissions"][0]))
    assert granted == bot_permissions()
    wanted = ("view_channel", "send_messages", "attach_files", "embed_links", "read_message_history")
    assert all(getattr(granted, name) for name in (*wanted, "use_external_emojis"))
    assert bin(granted.value).count("1") == 6  # nothing more: no admin, no manage, no mentions


def test_client_id_is_read_from_the_token() -> None:
    assert client_id_from_token(token_for(CLIENT_ID)) == CLIENT_ID
    with pytest.raises(BadToken):
        client_id_from_token("not a token at all")


def test_invite_url_command_prints_the_link(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISCORD_TOKEN", token_for(CLIENT_ID))
    main(["invite-url"])
    assert capsys.readouterr().out.strip() == invite_url(CLIENT_ID)
    main(["invite-url", "--client-id", "42"])
    assert capsys.readouterr().out.strip() == invite_url(42)


def test_invite_url_without_token_or_id_says_what_to_give(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISCORD_TOKEN", "")
    with pytest.raises(SystemExit, match="--client-id"):
        main(["invite-url"])


def test_admin_commands_are_hidden_from_members_without_manage_server() -> None:
    tree = app_commands.CommandTree(discord.Client(intents=discord.Intents.none()))
    manage = discord.Permissions(manage_guild=True).value
    payloads = {
        command.name: command.to_dict(tree)
        for cog in (Admin, Imagine, Account)
        for command in cog.__cog_app_commands__
    }
    assert payloads["quota"]["default_member_permissions"] == manage
    assert payloads["status"]["default_member_permissions"] == manage
    members = [name for name in payloads if name not in ("quota", "status")]
    assert "imagine" in members
    assert all(payloads[name].get("default_member_permissions") is None for name in members)
