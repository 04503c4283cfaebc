"""The link that adds the bot to a server: ``python -m bot invite-url``.

Scopes: ``bot`` (the bot user joins the server) and ``applications.commands`` (its slash
commands appear). Permissions are exactly what the bot uses, computed from discord.py's
``Permissions`` so the number is never typed by hand: see channels, post messages with images
and embeds, read the history its buttons live in, and show emojis from other servers in them.
No privileged intents are needed: commands and buttons arrive as interactions.
"""

from __future__ import annotations

import base64
import binascii

import discord

SCOPES = ("bot", "applications.commands")


def bot_permissions() -> discord.Permissions:
    """The permissions the bot asks for when it is invited."""
    return discord.Permissions(
        view_channel=True,
        send_messages=True,
        attach_files=True,
        embed_links=True,
        read_message_history=True,
        use_external_emojis=True,
    )


class BadToken(ValueError):
    """A token whose first part is not a base64-encoded application id."""


def client_id_from_token(token: str) -> int:
    """The application (client) id a bot token belongs to.

    A bot token's first dot-separated part is the bot user's id in base64, and a bot user's id
    is its application's id; reading it saves asking Discord (no network needed).
    """
    head = token.strip().split(".", 1)[0]
    try:
        text = base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise BadToken("the token does not start with an encoded application id") from exc
    if not text.isdigit():
        raise BadToken("the token does not start with an encoded application id")
    return int(text)


def invite_url(client_id: int) -> str:
    """The OAuth2 link that adds application ``client_id`` to a server with :func:`bot_permissions`."""
    return discord.utils.oauth_url(client_id, permissions=bot_permissions(), scopes=SCOPES)
