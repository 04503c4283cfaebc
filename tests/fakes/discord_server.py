# The wait helpers take a `timeout=` argument by design (the API other tests rely on).
# ruff: noqa: ASYNC109
"""A fake Discord (REST v10 + gateway) for driving the real discord.py client in tests.

The server runs in-process on ``127.0.0.1`` (aiohttp), speaks plain JSON text frames on the gateway
and records every HTTP request, so a test can start the *real* ``discord.ext.commands.Bot``,
inject slash commands and button presses, and assert on what the bot sent back.

Usage::

    from tests.fakes import FakeDiscord

    async def test_ping() -> None:
        async with FakeDiscord(token="fake-token") as fake:  # start() + install()
            bot = MyBot(guild_ready_timeout=0.05)  # see "Gotchas" below
            runner = asyncio.create_task(bot.start("fake-token"))
            await bot.wait_until_ready()

            inter = await fake.slash("imagine", {"prompt": "a red fox"})
            cb = await inter.callback()  # first POST /interactions/{id}/{token}/callback
            assert cb.json["type"] == 5  # deferred
            [followup] = await inter.followups()  # POST /webhooks/{app_id}/{token}
            assert followup.files[0].filename == "grid.png"

            message = await inter.wait_original(lambda m: m["components"])
            press = await fake.press("mirage:upscale:1", message)
            await press.callback()

            await bot.close()
            await runner

World: by default there is one guild (``fake.guild``) with a text channel (``fake.channel``),
an ``@everyone`` role, the bot's member and one human member (``fake.user``, "alice"). Add more with
:meth:`FakeDiscord.add_guild`, :meth:`~FakeDiscord.add_channel`, :meth:`~FakeDiscord.add_role`,
:meth:`~FakeDiscord.add_user` and :meth:`~FakeDiscord.add_member` *before* the bot connects (the
world is sent once, in GUILD_CREATE).

Redirecting discord.py (:meth:`FakeDiscord.install`): REST, webhooks and interaction callbacks all
build their URL from ``discord.http.Route.BASE`` when a ``Route`` is *constructed*; the gateway
uses ``discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY`` (and READY's ``resume_gateway_url`` for
resumes, which points back here). ``discord.http._set_api_version()`` overwrites ``Route.BASE``
with ``https://discord.com/api/vN``; nothing inside discord.py 2.7.1 calls it, but bot code (or a
library) may, so ``install()`` also wraps that function so the redirect survives it. Install before
``login()``; ``uninstall()`` (or leaving the ``with``/``async with`` block) restores all three.

Discord behaviours modelled (each one a fact of the real API that discord.py depends on):

* Interaction callbacks answer ``?with_response=1`` with ``{"interaction": ..., "resource": ...}``;
  a second callback is 400/40060; a callback after ``ack_deadline`` (3 s) or after the token
  expired is 404/10062.
* Tokens live ``token_ttl`` seconds (15 min); :meth:`FakeDiscord.expire_token` and
  :meth:`FakeDiscord.advance_clock` make that deterministic. Webhook calls with an expired or
  unknown token are 401/50027 "Invalid Webhook Token".
* The first followup after a deferred (type 5) response edits the "thinking…" message instead of
  creating one. After a type 6/7 response ``@original`` is the message carrying the component.
* Files larger than ``attachment_size_limit`` are 413/40005; more than 10 files, content over 2000
  characters, more than 5 rows / 5 buttons a row, a ``custom_id`` over 100 characters or duplicated
  are 400/50035 "Invalid Form Body" (discord.py checks none of these itself).
* Attachments get URLs on this server (``GET /attachments/...`` serves the bytes, so
  ``Attachment.read()`` works); their ``content_type`` is guessed from the filename because
  discord.py uploads every file as ``application/octet-stream`` (that is what
  :attr:`RecordedFile.content_type` shows).

Gotchas for tests:

* ``Client`` waits ``guild_ready_timeout`` (default 2 s) after the last GUILD_CREATE before it
  dispatches ``on_ready``; pass ``guild_ready_timeout=0.05`` to keep tests fast.
* After op 9 (:meth:`FakeDiscord.invalidate_sessions`) or any non-initial IDENTIFY, discord.py's
  ``Client.before_identify_hook`` sleeps 5 s; override it with a no-op in test bots. RESUME
  (:meth:`~FakeDiscord.drop_connections`, :meth:`~FakeDiscord.request_reconnect`) is immediate.
* Close the bot *before* stopping the fake: a bot whose gateway drops reconnects (with backoff).
* :meth:`FakeDiscord.fail_next` with status 500/502/504 makes discord.py sleep ``1 + 2*try``
  seconds before retrying; prefer 429 with a small ``retry_after`` for fast retry tests.
* JSON responses carry ``Content-Type: application/json`` exactly; discord.py ignores any other
  value (``; charset=utf-8`` breaks login).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime as dt
import io
import json
import mimetypes
import re
import secrets
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

import aiohttp
import yarl
from aiohttp import web
from multidict import CIMultiDict

__all__ = [
    "FailureRule",
    "FakeChannel",
    "FakeDiscord",
    "FakeGuild",
    "FakeInteraction",
    "FakeMember",
    "FakeRole",
    "FakeUser",
    "RecordedFile",
    "RecordedRequest",
]

T = TypeVar("T")

DISCORD_EPOCH_MS = 1_420_070_400_000
EPHEMERAL = 1 << 6
LOADING = 1 << 7
COMPONENTS_V2 = 1 << 15
DEFAULT_ATTACHMENT_LIMIT = 10 * 1024 * 1024

# Permission bits used to build a realistic default world.
_PERM_VIEW_CHANNEL = 1 << 10
_PERM_SEND_MESSAGES = 1 << 11
_PERM_EMBED_LINKS = 1 << 14
_PERM_ATTACH_FILES = 1 << 15
_PERM_READ_HISTORY = 1 << 16
_PERM_USE_APP_COMMANDS = 1 << 31
_PERM_ADMINISTRATOR = 1 << 3
EVERYONE_PERMISSIONS = (
    _PERM_VIEW_CHANNEL
    | _PERM_SEND_MESSAGES
    | _PERM_EMBED_LINKS
    | _PERM_ATTACH_FILES
    | _PERM_READ_HISTORY
    | _PERM_USE_APP_COMMANDS
)
# Every bit discord.py 2.7 knows about; an administrator (or the guild owner) gets them all.
ALL_PERMISSIONS = (1 << 53) - 1

# Interaction and callback types (Discord API numbers).
INTERACTION_PING = 1
INTERACTION_APPLICATION_COMMAND = 2
INTERACTION_COMPONENT = 3
INTERACTION_AUTOCOMPLETE = 4
INTERACTION_MODAL_SUBMIT = 5
CALLBACK_PONG = 1
CALLBACK_MESSAGE = 4
CALLBACK_DEFERRED_MESSAGE = 5
CALLBACK_DEFERRED_UPDATE = 6
CALLBACK_UPDATE_MESSAGE = 7
CALLBACK_AUTOCOMPLETE = 8
CALLBACK_MODAL = 9

_API_PREFIX = re.compile(r"^/api/v(?P<version>\d+)(?P<rest>/.*)?$")


# --------------------------------------------------------------------------------------------------
# Small helpers


class _Snowflakes:
    """Generates increasing snowflakes whose timestamp part is the current time."""

    def __init__(self) -> None:
        self._last = 0

    def next(self) -> int:
        """Return a new snowflake, strictly greater than the previous one."""
        now_ms = int(time.time() * 1000) - DISCORD_EPOCH_MS
        candidate = now_ms << 22
        # Several ids in the same millisecond: bump the increment bits instead of colliding.
        self._last = max(candidate, self._last + 1)
        return self._last


def snowflake_time(snowflake: int) -> dt.datetime:
    """The creation time encoded in a snowflake."""
    ms = (snowflake >> 22) + DISCORD_EPOCH_MS
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC)


def _iso(moment: dt.datetime | None = None) -> str:
    return (moment or dt.datetime.now(dt.UTC)).isoformat()


def _set_nested(tree: dict[str, Any], path: Sequence[str], leaf: dict[str, Any]) -> None:
    node = tree
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = leaf


def _form_error(code: str, message: str) -> dict[str, Any]:
    return {"_errors": [{"code": code, "message": message}]}


class _ApiError(Exception):
    """Raised by route handlers; becomes a Discord-shaped JSON error response."""

    def __init__(
        self, status: int, code: int, message: str, *, errors: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body: dict[str, Any] = {"code": code, "message": message}
        if errors:
            self.body["errors"] = dict(errors)


def _json_response(status: int, body: Any, headers: Mapping[str, str] | None = None) -> web.Response:
    # discord.py only parses JSON when Content-Type is exactly "application/json"; aiohttp's
    # text/json helpers append "; charset=utf-8", so the header is set by hand on a bytes body.
    merged = {"Content-Type": "application/json"}
    merged.update(headers or {})
    return web.Response(status=status, body=json.dumps(body).encode(), headers=merged)


# --------------------------------------------------------------------------------------------------
# Recorded traffic


@dataclass
class RecordedFile:
    """One uploaded file of a multipart request.

    ``content_type`` is what the client sent for the part (discord.py always sends
    ``application/octet-stream``); the stored attachment's type is guessed from ``filename``.
    """

    filename: str
    content_type: str
    data: bytes
    field: str = ""


@dataclass
class RecordedRequest:
    """One HTTP request the fake received, with the response it gave.

    ``path`` is relative to the API base (``/channels/1/messages``, without ``/api/v10``); requests
    outside the API (attachment downloads) keep their full path. ``json`` is the JSON body, or the
    parsed ``payload_json`` part of a multipart body. ``headers`` is case-insensitive.
    """

    method: str
    path: str
    query: dict[str, str]
    json: Any
    files: list[RecordedFile]
    headers: Mapping[str, str]
    route: str = ""
    interaction_token: str | None = None
    status: int | None = None
    response: Any = None
    api_version: int | None = None
    at: float = field(default_factory=time.monotonic)

    @property
    def callback_type(self) -> int | None:
        """The ``type`` of an interaction callback body, else ``None``."""
        if self.route == "interaction_callback" and isinstance(self.json, dict):
            return self.json.get("type")
        return None

    @property
    def message_payload(self) -> dict[str, Any]:
        """The message fields sent: a callback's ``data`` or the body itself for other routes."""
        if not isinstance(self.json, dict):
            return {}
        if self.route == "interaction_callback":
            return self.json.get("data") or {}
        return self.json

    def custom_ids(self) -> list[str]:
        """Every ``custom_id`` in the components of the sent message."""
        return list(_walk_custom_ids(self.message_payload.get("components") or []))


def _walk_components(components: Iterable[Any]) -> Iterable[dict[str, Any]]:
    for component in components:
        if not isinstance(component, dict):
            continue
        yield component
        yield from _walk_components(component.get("components") or [])
        for key in ("component", "accessory"):
            child = component.get(key)
            if isinstance(child, dict):
                yield from _walk_components([child])


def _walk_custom_ids(components: Iterable[Any]) -> Iterable[str]:
    for component in _walk_components(components):
        custom_id = component.get("custom_id")
        if custom_id is not None:
            yield custom_id


@dataclass
class FailureRule:
    """A queued failure from :meth:`FakeDiscord.fail_next` (``hits`` counts how often it fired)."""

    method: str
    path_regex: re.Pattern[str]
    status: int
    body: Any
    headers: dict[str, str]
    times: int
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        """Whether this rule applies to ``method`` ``path`` (API-relative path)."""
        if self.hits >= self.times:
            return False
        return self.method in ("*", method.upper()) and self.path_regex.search(path) is not None


# --------------------------------------------------------------------------------------------------
# The world


@dataclass
class FakeUser:
    """A Discord user; ``to_payload()`` gives the fields discord.py requires (avatar, discriminator)."""

    id: int
    username: str
    global_name: str | None = None
    discriminator: str = "0"
    avatar: str | None = None
    bot: bool = False

    def to_payload(self) -> dict[str, Any]:
        """The user object as the API sends it."""
        return {
            "id": str(self.id),
            "username": self.username,
            "global_name": self.global_name,
            "discriminator": self.discriminator,
            "avatar": self.avatar,
            "bot": self.bot,
            "public_flags": 0,
            "flags": 0,
            "banner": None,
            "accent_color": None,
            "avatar_decoration_data": None,
            "primary_guild": None,
            "collectibles": None,
        }


@dataclass
class FakeRole:
    """A guild role; the ``@everyone`` role's id is the guild's id."""

    id: int
    name: str
    permissions: int = 0
    position: int = 0
    managed: bool = False

    def to_payload(self) -> dict[str, Any]:
        """The role object as the API sends it."""
        return {
            "id": str(self.id),
            "name": self.name,
            "permissions": str(self.permissions),
            "position": self.position,
            "color": 0,
            "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
            "hoist": False,
            "icon": None,
            "unicode_emoji": None,
            "managed": self.managed,
            "mentionable": False,
            "flags": 0,
        }


@dataclass
class FakeChannel:
    """A guild channel (type 0 = text) or a DM channel (type 1, ``guild_id`` None)."""

    id: int
    name: str
    guild_id: int | None
    type: int = 0
    position: int = 0
    topic: str | None = None
    nsfw: bool = False
    parent_id: int | None = None
    recipients: list[FakeUser] = field(default_factory=list)

    def to_payload(self, *, include_guild_id: bool = True) -> dict[str, Any]:
        """The channel object as the API sends it."""
        if self.type == 1:
            return {
                "id": str(self.id),
                "type": 1,
                "last_message_id": None,
                "flags": 0,
                "recipients": [user.to_payload() for user in self.recipients],
            }
        payload: dict[str, Any] = {
            "id": str(self.id),
            "type": self.type,
            "name": self.name,
            "position": self.position,
            "topic": self.topic,
            "nsfw": self.nsfw,
            "parent_id": None if self.parent_id is None else str(self.parent_id),
            "last_message_id": None,
            "rate_limit_per_user": 0,
            "permission_overwrites": [],
            "flags": 0,
        }
        if include_guild_id and self.guild_id is not None:
            payload["guild_id"] = str(self.guild_id)
        return payload


@dataclass
class FakeMember:
    """A user's membership in a guild.

    ``roles`` excludes ``@everyone``. ``permissions`` overrides the computed value (OR of the role
    permissions) sent as ``member.permissions`` in interactions.
    """

    user: FakeUser
    guild_id: int
    roles: list[int] = field(default_factory=list)
    nick: str | None = None
    permissions: int | None = None
    flags: int = 0
    joined_at: str = field(default_factory=_iso)

    def to_payload(self, *, permissions: int | None = None) -> dict[str, Any]:
        """The guild member object; ``permissions`` is added for interaction payloads."""
        payload: dict[str, Any] = {
            "user": self.user.to_payload(),
            "roles": [str(role) for role in self.roles],
            "nick": self.nick,
            "avatar": None,
            "banner": None,
            "joined_at": self.joined_at,
            "premium_since": None,
            "deaf": False,
            "mute": False,
            "flags": self.flags,
            "pending": False,
            "communication_disabled_until": None,
        }
        if permissions is not None:
            payload["permissions"] = str(permissions)
        return payload


@dataclass
class FakeGuild:
    """A guild with its roles, channels and members."""

    id: int
    name: str
    owner_id: int
    roles: list[FakeRole] = field(default_factory=list)
    channels: list[FakeChannel] = field(default_factory=list)
    members: list[FakeMember] = field(default_factory=list)
    locale: str = "en-US"

    def member(self, user_id: int) -> FakeMember | None:
        """The member with this user id, if any."""
        return next((m for m in self.members if m.user.id == user_id), None)

    def role(self, role_id: int) -> FakeRole | None:
        """The role with this id, if any."""
        return next((r for r in self.roles if r.id == role_id), None)

    def channel(self, channel_id: int) -> FakeChannel | None:
        """The channel with this id, if any."""
        return next((c for c in self.channels if c.id == channel_id), None)

    def permissions_of(self, member: FakeMember) -> int:
        """The member's guild-level permissions (owner and administrator get everything)."""
        if member.permissions is not None:
            return member.permissions
        if member.user.id == self.owner_id:
            return ALL_PERMISSIONS
        value = 0
        for role in self.roles:
            if role.id == self.id or role.id in member.roles:
                value |= role.permissions
        return ALL_PERMISSIONS if value & _PERM_ADMINISTRATOR else value

    def to_payload(self, *, full: bool = True) -> dict[str, Any]:
        """GUILD_CREATE shape when ``full``; the REST ``GET /guilds/{id}`` shape otherwise."""
        payload: dict[str, Any] = {
            "id": str(self.id),
            "name": self.name,
            "icon": None,
            "splash": None,
            "discovery_splash": None,
            "banner": None,
            "owner_id": str(self.owner_id),
            "afk_channel_id": None,
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "roles": [role.to_payload() for role in self.roles],
            "emojis": [],
            "stickers": [],
            "features": [],
            "mfa_level": 0,
            "system_channel_id": None,
            "system_channel_flags": 0,
            "rules_channel_id": None,
            "vanity_url_code": None,
            "description": None,
            "premium_tier": 0,
            "premium_subscription_count": 0,
            "preferred_locale": self.locale,
            "public_updates_channel_id": None,
            "nsfw_level": 0,
            "premium_progress_bar_enabled": False,
        }
        if full:
            payload.update(
                {
                    "unavailable": False,
                    "large": False,
                    # member_count == len(members) marks the guild as chunked, so discord.py does
                    # not send REQUEST_GUILD_MEMBERS at startup.
                    "member_count": len(self.members),
                    "joined_at": _iso(),
                    "channels": [c.to_payload(include_guild_id=False) for c in self.channels],
                    "members": [m.to_payload() for m in self.members],
                    "threads": [],
                    "presences": [],
                    "voice_states": [],
                    "stage_instances": [],
                    "guild_scheduled_events": [],
                    "soundboard_sounds": [],
                }
            )
        return payload


# --------------------------------------------------------------------------------------------------
# Interactions


class FakeInteraction:
    """An interaction injected by :meth:`FakeDiscord.slash`, :meth:`~FakeDiscord.press` or
    :meth:`~FakeDiscord.submit_modal`, with the fake's view of how it was answered.

    Attributes: ``id``, ``token``, ``type``, ``payload`` (the INTERACTION_CREATE data sent),
    ``response_type`` (callback type once acknowledged), ``original_message_id``, ``modal`` (the
    modal a type 9 callback opened), ``autocomplete_choices``.
    """

    def __init__(self, fake: FakeDiscord, payload: dict[str, Any]) -> None:
        self.fake = fake
        self.payload = payload
        self.id: int = int(payload["id"])
        self.token: str = payload["token"]
        self.type: int = payload["type"]
        self.guild_id: int | None = int(payload["guild_id"]) if payload.get("guild_id") else None
        self.channel_id: int = int(payload["channel_id"])
        user = payload["member"]["user"] if "member" in payload else payload["user"]
        self.user: dict[str, Any] = user
        data = payload.get("data") or {}
        self.command_name: str | None = (
            data.get("name") if self.type == INTERACTION_APPLICATION_COMMAND else None
        )
        self.custom_id: str | None = data.get("custom_id")
        message = payload.get("message")
        self.message_id: int | None = int(message["id"]) if message else None
        self.created_at: float = fake.now()
        self.expired = False
        self.response_type: int | None = None
        self.original_message_id: int | None = None
        self.loading = False
        self.modal: dict[str, Any] | None = None
        self.autocomplete_choices: list[dict[str, Any]] | None = None

    def __repr__(self) -> str:
        return f"<FakeInteraction id={self.id} type={self.type} response_type={self.response_type}>"

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every recorded request that used this interaction's token."""
        return [r for r in self.fake.requests if r.interaction_token == self.token]

    def is_token_valid(self) -> bool:
        """Whether webhook calls with this token would still be accepted."""
        return not self.expired and self.fake.now() - self.created_at < self.fake.token_ttl

    def expire(self) -> None:
        """Expire the token now (followups/edits get 401/50027, callbacks 404/10062)."""
        self.expired = True

    async def callback(self, timeout: float = 5.0) -> RecordedRequest:
        """Wait for and return the first callback request (whatever its outcome)."""
        return await self.fake.wait_for_request(
            lambda r: r.route == "interaction_callback" and r.interaction_token == self.token,
            timeout=timeout,
        )

    async def followups(self, count: int = 1, timeout: float = 5.0) -> list[RecordedRequest]:
        """Wait until at least ``count`` followup POSTs (``/webhooks/{app}/{token}``) were made."""
        return await self._at_least("webhook_execute", count, timeout)

    async def edits(self, count: int = 1, timeout: float = 5.0) -> list[RecordedRequest]:
        """Wait until at least ``count`` webhook message PATCHes (``@original`` or by id) were made."""
        return await self._at_least("webhook_message_edit", count, timeout)

    async def _at_least(self, route: str, count: int, timeout: float) -> list[RecordedRequest]:
        def check() -> list[RecordedRequest] | None:
            found = [r for r in self.requests if r.route == route]
            return found if len(found) >= count else None

        return await self.fake._wait_until(check, timeout, f"{count} {route} request(s) for {self!r}")

    def original_message(self) -> dict[str, Any] | None:
        """A snapshot of the current ``@original`` message, or ``None`` if there is none yet."""
        if self.original_message_id is None:
            return None
        message = self.fake.get_message(self.original_message_id)
        return copy.deepcopy(message) if message is not None else None

    async def wait_original(
        self, predicate: Callable[[dict[str, Any]], bool] | None = None, timeout: float = 5.0
    ) -> dict[str, Any]:
        """Wait until ``@original`` exists (and satisfies ``predicate``); return a snapshot."""

        def check() -> dict[str, Any] | None:
            message = self.original_message()
            if message is None or (predicate is not None and not predicate(message)):
                return None
            return message

        return await self.fake._wait_until(check, timeout, f"original message of {self!r}")


# --------------------------------------------------------------------------------------------------
# Gateway sessions


class _GatewayConnection:
    """One websocket; sends are serialised so sequence numbers reach the client in order."""

    def __init__(self, ws: web.WebSocketResponse, query: Mapping[str, str]) -> None:
        self.ws = ws
        self.query = dict(query)
        self.session: _GatewaySession | None = None
        self.lock = asyncio.Lock()

    async def send(self, payload: Mapping[str, Any]) -> None:
        async with self.lock:
            await self._send_locked(payload)

    async def _send_locked(self, payload: Mapping[str, Any]) -> None:
        if self.ws.closed:
            return
        # A client that vanished mid-send is a normal test situation (e.g. a bot restart).
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.ws.send_str(json.dumps(payload))


class _GatewaySession:
    """A gateway session: survives disconnects so RESUME can replay missed dispatches."""

    HISTORY_LIMIT = 1000

    def __init__(self, session_id: str, identify: dict[str, Any]) -> None:
        self.session_id = session_id
        self.identify = identify
        self.seq = 0
        self.history: list[dict[str, Any]] = []
        self.connection: _GatewayConnection | None = None

    @property
    def live(self) -> bool:
        return self.connection is not None and not self.connection.ws.closed

    async def dispatch(self, event: str, data: Any) -> None:
        connection = self.connection
        if connection is None:
            self._record(event, data)
            return
        async with connection.lock:
            # Number and send under one lock so frames leave in sequence order.
            payload = self._record(event, data)
            await connection._send_locked(payload)

    def _record(self, event: str, data: Any) -> dict[str, Any]:
        self.seq += 1
        payload = {"op": 0, "t": event, "s": self.seq, "d": data}
        self.history.append(payload)
        del self.history[: -self.HISTORY_LIMIT]
        return payload


# --------------------------------------------------------------------------------------------------
# Installation (redirecting discord.py)


class _Installation:
    """Undo handle returned by :meth:`FakeDiscord.install`; also a context manager."""

    def __init__(self, fake: FakeDiscord) -> None:
        import discord.gateway
        import discord.http

        self._fake = fake
        self._http = discord.http
        self._gateway_cls = discord.gateway.DiscordWebSocket
        self._old_base = discord.http.Route.BASE
        self._old_gateway = self._gateway_cls.DEFAULT_GATEWAY
        self._old_set_version = discord.http._set_api_version
        self.active = False

    def apply(self) -> None:
        http = self._http
        fake = self._fake
        original_set_version = self._old_set_version

        def sticky_set_api_version(value: int) -> None:
            # The original validates and resets Route.BASE to discord.com; point it back here.
            original_set_version(value)
            http.Route.BASE = f"{fake.base_url}/api/v{value}"

        http.Route.BASE = f"{fake.base_url}/api/v{http.INTERNAL_API_VERSION}"
        http._set_api_version = sticky_set_api_version
        self._gateway_cls.DEFAULT_GATEWAY = yarl.URL(fake.gateway_url)
        self.active = True

    def uninstall(self) -> None:
        """Restore Route.BASE, DEFAULT_GATEWAY and ``_set_api_version``."""
        if not self.active:
            return
        self._http.Route.BASE = self._old_base
        self._http._set_api_version = self._old_set_version
        self._gateway_cls.DEFAULT_GATEWAY = self._old_gateway
        self.active = False

    def __enter__(self) -> FakeDiscord:
        return self._fake

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.uninstall()


# --------------------------------------------------------------------------------------------------
# The server


_Handler = Callable[["_Ctx"], Awaitable[Any]]


@dataclass
class _Route:
    method: str
    pattern: re.Pattern[str]
    name: str
    handler: _Handler
    auth: bool = True
    token_group: str | None = None


@dataclass
class _Ctx:
    request: web.Request
    record: RecordedRequest
    match: re.Match[str]

    def int_param(self, name: str) -> int:
        return int(self.match.group(name))

    def param(self, name: str) -> str:
        return self.match.group(name)

    @property
    def body(self) -> dict[str, Any]:
        return self.record.json if isinstance(self.record.json, dict) else {}


class FakeDiscord:
    """An in-process fake of Discord's REST API (v10) and gateway for the real discord.py client.

    Args:
        application_id: the application (and bot user) id; random snowflake by default.
        bot_name: the bot user's username.
        token: if set, REST calls and IDENTIFY must use it (else 401 / close 4004); ``None`` accepts
            any token.
        default_world: create one guild with ``#general``, ``@everyone`` and a member "alice".
        token_ttl: seconds an interaction token accepts webhook calls (Discord: 15 minutes).
        ack_deadline: seconds to send the first callback before it is 404/10062 (Discord: 3 s);
            ``None`` disables the check.
        attachment_size_limit: bytes per file; larger files are 413/40005. Also sent as
            ``attachment_size_limit`` in interactions (``Interaction.filesize_limit``).
        heartbeat_interval_ms: sent in HELLO.
        connect_timeout: how long :meth:`send_dispatch` (and so ``slash``/``press``) waits for a
            connected bot.
    """

    def __init__(
        self,
        *,
        application_id: int | None = None,
        bot_name: str = "Mirage",
        token: str | None = None,
        default_world: bool = True,
        token_ttl: float = 15 * 60,
        ack_deadline: float | None = 3.0,
        attachment_size_limit: int = DEFAULT_ATTACHMENT_LIMIT,
        heartbeat_interval_ms: int = 41_250,
        connect_timeout: float = 10.0,
        host: str = "127.0.0.1",
    ) -> None:
        self._ids = _Snowflakes()
        self.application_id: int = application_id or self._ids.next()
        self.bot_user = FakeUser(
            id=self.application_id,
            username=bot_name,
            global_name=None,
            discriminator="0001",
            avatar=secrets.token_hex(16),
            bot=True,
        )
        self.token = token
        self.token_ttl = token_ttl
        self.ack_deadline = ack_deadline
        self.attachment_size_limit = attachment_size_limit
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.connect_timeout = connect_timeout
        self.host = host

        self.users: dict[int, FakeUser] = {self.bot_user.id: self.bot_user}
        # The application owner (AppInfo needs one); not a guild member unless added.
        self.owner = FakeUser(id=self._ids.next(), username="owner", avatar=None)
        self.users[self.owner.id] = self.owner
        self.guilds: list[FakeGuild] = []
        self.dm_channels: dict[int, FakeChannel] = {}  # by recipient user id

        self.requests: list[RecordedRequest] = []
        self.messages: list[dict[str, Any]] = []
        self._messages_by_id: dict[int, dict[str, Any]] = {}
        self.deleted_message_ids: list[int] = []
        self._files: dict[int, tuple[str, str, bytes]] = {}
        self.interactions: dict[str, FakeInteraction] = {}
        self._commands: dict[int | None, list[dict[str, Any]]] = {}
        self._command_ids: dict[tuple[int | None, str, int], int] = {}
        self._failures: list[FailureRule] = []

        self.gateway_received: list[dict[str, Any]] = []
        self.identify_count = 0
        self.resume_count = 0
        self._sessions: dict[str, _GatewaySession] = {}
        self._connections: list[_GatewayConnection] = []

        self._clock_offset = 0.0
        self._changed: asyncio.Condition | None = None
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._installation: _Installation | None = None
        self._routes = self._build_routes()

        if default_world:
            guild = self.add_guild("Mirage Test Guild")
            self.add_member(guild, self.add_user("alice", global_name="Alice"))

    # ---------------------------------------------------------------------------- world builders

    def new_id(self) -> int:
        """A fresh snowflake."""
        return self._ids.next()

    def add_user(
        self,
        username: str,
        *,
        global_name: str | None = None,
        discriminator: str = "0",
        avatar: str | None = "default",
        bot: bool = False,
        id: int | None = None,
    ) -> FakeUser:
        """Create a user (``avatar="default"`` gives a random hash, ``None`` no avatar)."""
        user = FakeUser(
            id=id or self.new_id(),
            username=username,
            global_name=global_name,
            discriminator=discriminator,
            avatar=secrets.token_hex(16) if avatar == "default" else avatar,
            bot=bot,
        )
        self.users[user.id] = user
        return user

    def add_guild(
        self,
        name: str,
        *,
        id: int | None = None,
        owner: FakeUser | None = None,
        channels: Sequence[str] = ("general",),
        everyone_permissions: int = EVERYONE_PERMISSIONS,
        locale: str = "en-US",
    ) -> FakeGuild:
        """Create a guild with an ``@everyone`` role, the bot as member and text ``channels``."""
        guild_id = id or self.new_id()
        guild = FakeGuild(
            id=guild_id,
            name=name,
            owner_id=owner.id if owner else self.new_id(),
            roles=[FakeRole(id=guild_id, name="@everyone", permissions=everyone_permissions)],
            locale=locale,
        )
        self.guilds.append(guild)
        bot_role = self.add_role(
            guild, self.bot_user.username, permissions=EVERYONE_PERMISSIONS, managed=True
        )
        self.add_member(guild, self.bot_user, roles=[bot_role])
        if owner is not None:
            self.add_member(guild, owner)
        for channel_name in channels:
            self.add_channel(guild, channel_name)
        return guild

    def add_channel(
        self, guild: FakeGuild, name: str, *, type: int = 0, id: int | None = None
    ) -> FakeChannel:
        """Add a channel (default a text channel) to ``guild``."""
        channel = FakeChannel(
            id=id or self.new_id(), name=name, guild_id=guild.id, type=type, position=len(guild.channels)
        )
        guild.channels.append(channel)
        return channel

    def add_role(
        self,
        guild: FakeGuild,
        name: str,
        *,
        permissions: int = 0,
        managed: bool = False,
        id: int | None = None,
    ) -> FakeRole:
        """Add a role to ``guild``."""
        role = FakeRole(
            id=id or self.new_id(),
            name=name,
            permissions=permissions,
            position=len(guild.roles),
            managed=managed,
        )
        guild.roles.append(role)
        return role

    def add_member(
        self,
        guild: FakeGuild,
        user: FakeUser | str,
        *,
        roles: Iterable[FakeRole | int] = (),
        nick: str | None = None,
        permissions: int | None = None,
        flags: int = 0,
    ) -> FakeMember:
        """Make ``user`` (or a new user with that username) a member of ``guild``."""
        if isinstance(user, str):
            user = self.add_user(user)
        self.users.setdefault(user.id, user)
        member = FakeMember(
            user=user,
            guild_id=guild.id,
            roles=[r.id if isinstance(r, FakeRole) else int(r) for r in roles],
            nick=nick,
            permissions=permissions,
            flags=flags,
        )
        guild.members = [m for m in guild.members if m.user.id != user.id] + [member]
        return member

    @property
    def guild(self) -> FakeGuild:
        """The first guild."""
        return self.guilds[0]

    @property
    def channel(self) -> FakeChannel:
        """The first text channel of the first guild."""
        return next(c for c in self.guild.channels if c.type == 0)

    @property
    def user(self) -> FakeUser:
        """The first human member of the first guild."""
        return next(m.user for m in self.guild.members if not m.user.bot)

    def _guild_by_id(self, guild_id: int) -> FakeGuild | None:
        return next((g for g in self.guilds if g.id == guild_id), None)

    def _channel_by_id(self, channel_id: int) -> FakeChannel | None:
        for guild in self.guilds:
            channel = guild.channel(channel_id)
            if channel is not None:
                return channel
        return next((c for c in self.dm_channels.values() if c.id == channel_id), None)

    def _dm_channel(self, user: FakeUser) -> FakeChannel:
        channel = self.dm_channels.get(user.id)
        if channel is None:
            channel = FakeChannel(id=self.new_id(), name="", guild_id=None, type=1, recipients=[user])
            self.dm_channels[user.id] = channel
        return channel

    # ---------------------------------------------------------------------------- lifecycle

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`)."""
        if self._port is None:
            raise RuntimeError("FakeDiscord is not started")
        return self._port

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{self.host}:{self.port}"

    @property
    def api_base(self) -> str:
        """``http://127.0.0.1:PORT/api/v10`` (what ``Route.BASE`` is set to)."""
        return f"{self.base_url}/api/v10"

    @property
    def gateway_url(self) -> str:
        """``ws://127.0.0.1:PORT/gateway``."""
        return f"ws://{self.host}:{self.port}/gateway"

    def now(self) -> float:
        """The fake's clock (monotonic seconds plus :meth:`advance_clock` offsets)."""
        return time.monotonic() + self._clock_offset

    def advance_clock(self, seconds: float) -> None:
        """Move the fake's clock forward (token TTL and ack deadline use it)."""
        self._clock_offset += seconds

    async def start(self) -> None:
        """Bind a free port on ``host`` and start serving."""
        if self._runner is not None:
            return
        self._changed = asyncio.Condition()
        # Requests are read in full before the size checks so the fake, not aiohttp, answers 413.
        app = web.Application(client_max_size=1024**3)
        app.router.add_get("/gateway", self._gateway_handler)
        app.router.add_route("*", "/{tail:.*}", self._http_handler)
        # shutdown_timeout bounds how long stop() waits for in-flight handlers.
        runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
        await runner.setup()
        # Binding our own socket to port 0 gives a free port without races or private attributes.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        self._port = sock.getsockname()[1]
        # A burst of simultaneous interactions (the benchmark sends 200) overflows aiohttp's default
        # backlog of 128, and TCP's 1 s SYN retry would then be measured as bot latency.
        await web.SockSite(runner, sock, backlog=1024).start()
        self._runner = runner

    async def stop(self) -> None:
        """Close gateway connections, stop serving and undo :meth:`install`."""
        self.uninstall()
        for connection in list(self._connections):
            with contextlib.suppress(Exception):
                await connection.ws.close(code=1001, message=b"fake discord stopping")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def install(self) -> _Installation:
        """Point discord.py at this server; returns a handle usable as a ``with`` block.

        Sets ``discord.http.Route.BASE`` and ``DiscordWebSocket.DEFAULT_GATEWAY`` and wraps
        ``discord.http._set_api_version`` so that calling it keeps the redirect. Call after
        :meth:`start` and before the client's ``login()``.
        """
        if self._installation is None or not self._installation.active:
            self._installation = _Installation(self)
            self._installation.apply()
        return self._installation

    def uninstall(self) -> None:
        """Undo :meth:`install` (no-op if not installed)."""
        if self._installation is not None:
            self._installation.uninstall()
            self._installation = None

    async def __aenter__(self) -> FakeDiscord:
        await self.start()
        self.install()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ---------------------------------------------------------------------------- waiting

    async def _notify(self) -> None:
        if self._changed is None:
            return
        async with self._changed:
            self._changed.notify_all()

    async def _wait_until(self, check: Callable[[], T | None], timeout: float, what: str) -> T:
        if self._changed is None:
            raise RuntimeError("FakeDiscord is not started")
        try:
            async with asyncio.timeout(timeout), self._changed:
                while True:
                    result = check()
                    if result is not None:
                        return result
                    await self._changed.wait()
        except TimeoutError:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}") from None

    async def wait_for_request(
        self,
        predicate: Callable[[RecordedRequest], bool],
        timeout: float = 10.0,
        *,
        include_past: bool = True,
    ) -> RecordedRequest:
        """Return the first recorded request matching ``predicate``, waiting up to ``timeout``.

        Requests are recorded once answered (``status`` is set). With ``include_past`` (default)
        requests that arrived before the call count too, which avoids races; use a precise
        predicate, ``include_past=False`` or :meth:`clear_requests` to skip older ones.
        """
        start = 0 if include_past else len(self.requests)

        def check() -> RecordedRequest | None:
            return next((r for r in self.requests[start:] if predicate(r)), None)

        return await self._wait_until(check, timeout, "a matching request")

    def clear_requests(self) -> None:
        """Forget recorded requests."""
        self.requests.clear()

    def find_requests(self, method: str | None = None, route: str | None = None) -> list[RecordedRequest]:
        """Recorded requests filtered by method and/or route name (e.g. ``"webhook_execute"``)."""
        return [
            r
            for r in self.requests
            if (method is None or r.method == method.upper()) and (route is None or r.route == route)
        ]

    def get_message(self, message_id: int | str) -> dict[str, Any] | None:
        """The live stored message (edits mutate it), or ``None``."""
        return self._messages_by_id.get(int(message_id))

    async def wait_for_message(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0
    ) -> dict[str, Any]:
        """Wait until a stored message (in its current state) matches; return a snapshot copy."""

        def check() -> dict[str, Any] | None:
            found = next((m for m in self.messages if predicate(m)), None)
            return copy.deepcopy(found) if found is not None else None

        return await self._wait_until(check, timeout, "a matching message")

    # ---------------------------------------------------------------------------- failures / tokens

    def fail_next(
        self,
        method: str,
        path_regex: str,
        status: int,
        body: Any = None,
        *,
        times: int = 1,
        retry_after: float = 0.05,
        is_global: bool = False,
        headers: Mapping[str, str] | None = None,
    ) -> FailureRule:
        """Answer the next ``times`` matching requests with ``status`` instead of handling them.

        ``method`` is an HTTP method or ``"*"``; ``path_regex`` is searched in the API-relative
        path (e.g. ``r"^/webhooks/"``). For 429 the body and headers are what discord.py expects to
        retry (``retry_after`` in the JSON body and a ``Via`` header, else it treats the 429 as a
        Cloudflare ban and raises).
        """
        extra: dict[str, str] = {}
        if status == 429:
            if body is None:
                body = {
                    "message": "You are being rate limited.",
                    "retry_after": retry_after,
                    "global": is_global,
                }
            reset = time.time() + retry_after
            extra = {
                "Via": "1.1 google",
                "Retry-After": str(max(1, round(retry_after))),
                "X-RateLimit-Limit": "5",
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": f"{reset:.3f}",
                "X-RateLimit-Reset-After": f"{retry_after:.3f}",
                "X-RateLimit-Bucket": "fake-" + uuid.uuid4().hex[:12],
                "X-RateLimit-Scope": "global" if is_global else "user",
            }
            if is_global:
                extra["X-RateLimit-Global"] = "true"
        elif body is None:
            body = {"message": f"{status}: fake failure", "code": 0}
        extra.update(headers or {})
        rule = FailureRule(method.upper(), re.compile(path_regex), status, body, extra, times)
        self._failures.append(rule)
        return rule

    def expire_token(self, token: str | FakeInteraction) -> None:
        """Expire an interaction token now (webhook calls get 401/50027)."""
        key = token.token if isinstance(token, FakeInteraction) else token
        interaction = self.interactions.get(key)
        if interaction is None:
            raise KeyError(f"unknown interaction token {key!r}")
        interaction.expire()

    # ---------------------------------------------------------------------------- application commands

    def commands(self, guild: FakeGuild | int | None = None) -> list[dict[str, Any]]:
        """Registered commands: global ones, or those of ``guild``."""
        guild_id = guild.id if isinstance(guild, FakeGuild) else guild
        return copy.deepcopy(self._commands.get(guild_id, []))

    def _find_command(self, name: str, guild_id: int | None) -> dict[str, Any] | None:
        for scope in (guild_id, None):
            for command in self._commands.get(scope, []):
                if command["name"] == name and command.get("type", 1) == 1:
                    return command
        return None

    def _store_commands(self, guild_id: int | None, payload: list[dict[str, Any]]) -> list[dict[str, Any]]:
        stored = []
        for raw in payload:
            command = copy.deepcopy(raw)
            command_type = command.get("type", 1)
            # Discord keeps a command's id across bulk overwrites when name and type match.
            key = (guild_id, command["name"], command_type)
            command_id = self._command_ids.setdefault(key, self.new_id())
            command.update(
                {
                    "id": str(command_id),
                    "application_id": str(self.application_id),
                    "type": command_type,
                    "version": str(self.new_id()),
                    "description": command.get("description", ""),
                    "default_member_permissions": command.get("default_member_permissions"),
                    "nsfw": command.get("nsfw", False),
                }
            )
            if guild_id is not None:
                command["guild_id"] = str(guild_id)
            stored.append(command)
        self._commands[guild_id] = stored
        return copy.deepcopy(stored)

    # ---------------------------------------------------------------------------- gateway

    @property
    def connected(self) -> bool:
        """Whether a client is connected with an identified or resumed session."""
        return any(s.live for s in self._sessions.values())

    async def wait_until_connected(self, timeout: float | None = None) -> None:
        """Wait until a client has identified (or resumed) on the gateway."""
        await self._wait_until(
            lambda: True if self.connected else None,
            self.connect_timeout if timeout is None else timeout,
            "a gateway client",
        )

    async def send_dispatch(self, event: str, data: Any, *, timeout: float | None = None) -> int:
        """Send a DISPATCH (op 0) ``event`` to every connected session; returns how many got it.

        Waits for a connected client first (``connect_timeout``). Each session numbers its own
        events and keeps them for RESUME replay.
        """
        await self.wait_until_connected(timeout)
        sessions = [s for s in self._sessions.values() if s.live]
        for session in sessions:
            await session.dispatch(event, data)
        return len(sessions)

    async def drop_connections(self, code: int = 4000) -> None:
        """Close every gateway websocket (sessions stay resumable; discord.py RESUMEs)."""
        for connection in list(self._connections):
            await connection.ws.close(code=code, message=b"fake discord dropped the connection")

    async def request_reconnect(self) -> None:
        """Send op 7 RECONNECT to every connected client."""
        for connection in list(self._connections):
            await connection.send({"op": 7, "d": None, "s": None, "t": None})

    async def invalidate_sessions(self, *, resumable: bool = False) -> None:
        """Send op 9 INVALID_SESSION; unless ``resumable`` the sessions are forgotten."""
        for connection in list(self._connections):
            await connection.send({"op": 9, "d": resumable, "s": None, "t": None})
        if not resumable:
            self._sessions.clear()

    async def _gateway_handler(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        connection = _GatewayConnection(ws, request.query)
        self._connections.append(connection)
        try:
            await connection.send(
                {
                    "op": 10,
                    "d": {"heartbeat_interval": self.heartbeat_interval_ms, "_trace": ["fake-gateway"]},
                    "s": None,
                    "t": None,
                }
            )
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    await self._on_gateway_payload(connection, json.loads(msg.data))
                elif msg.type is aiohttp.WSMsgType.ERROR:
                    break
        finally:
            self._connections.remove(connection)
            session = connection.session
            if session is not None and session.connection is connection:
                session.connection = None
            await self._notify()
        return ws

    async def _on_gateway_payload(self, connection: _GatewayConnection, payload: dict[str, Any]) -> None:
        self.gateway_received.append(payload)
        op = payload.get("op")
        data = payload.get("d")
        if op == 1:  # HEARTBEAT
            await connection.send({"op": 11, "d": None, "s": None, "t": None})
        elif op == 2:  # IDENTIFY
            await self._identify(connection, data or {})
        elif op == 6:  # RESUME
            await self._resume(connection, data or {})
        elif op == 8:  # REQUEST_GUILD_MEMBERS
            await self._members_chunk(connection, data or {})
        elif op in (3, 4):  # PRESENCE_UPDATE, VOICE_STATE_UPDATE: accepted, nothing to do
            pass
        else:
            await connection.ws.close(code=4001, message=b"Unknown opcode")

    def _token_ok(self, token: str | None) -> bool:
        if self.token is None:
            return bool(token)
        return token in (self.token, f"Bot {self.token}")

    async def _identify(self, connection: _GatewayConnection, data: dict[str, Any]) -> None:
        if not self._token_ok(data.get("token")):
            await connection.ws.close(code=4004, message=b"Authentication failed.")
            return
        self.identify_count += 1
        session = _GatewaySession(uuid.uuid4().hex, data)
        self._sessions[session.session_id] = session
        session.connection = connection
        connection.session = session
        ready: dict[str, Any] = {
            "v": 10,
            "user": {**self.bot_user.to_payload(), "verified": True, "mfa_enabled": False, "email": None},
            "guilds": [{"id": str(g.id), "unavailable": True} for g in self.guilds],
            "session_id": session.session_id,
            "session_type": "normal",
            "resume_gateway_url": self.gateway_url,
            "application": {"id": str(self.application_id), "flags": 0},
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "guild_join_requests": [],
            "geo_ordered_rtc_regions": ["fake"],
            "auth": {},
            "_trace": ["fake-gateway"],
        }
        if "shard" in data:
            ready["shard"] = data["shard"]
        await session.dispatch("READY", ready)
        for guild in self.guilds:
            await session.dispatch("GUILD_CREATE", guild.to_payload(full=True))
        await self._notify()

    async def _resume(self, connection: _GatewayConnection, data: dict[str, Any]) -> None:
        session = self._sessions.get(data.get("session_id") or "")
        if session is None or not self._token_ok(data.get("token")):
            await connection.send({"op": 9, "d": False, "s": None, "t": None})
            return
        self.resume_count += 1
        session.connection = connection
        connection.session = session
        last_seen = data.get("seq") or 0
        async with connection.lock:
            for payload in [p for p in session.history if p["s"] > last_seen]:
                await connection._send_locked(payload)
        await session.dispatch("RESUMED", {"_trace": ["fake-gateway"]})
        await self._notify()

    async def _members_chunk(self, connection: _GatewayConnection, data: dict[str, Any]) -> None:
        session = connection.session
        if session is None:
            return
        guild_ids = data.get("guild_id")
        for guild_id in guild_ids if isinstance(guild_ids, list) else [guild_ids]:
            guild = self._guild_by_id(int(guild_id))
            if guild is None:
                continue
            chunk = {
                "guild_id": str(guild.id),
                "members": [m.to_payload() for m in guild.members],
                "chunk_index": 0,
                "chunk_count": 1,
                "not_found": [],
            }
            if data.get("nonce") is not None:
                chunk["nonce"] = data["nonce"]
            await session.dispatch("GUILD_MEMBERS_CHUNK", chunk)

    # ---------------------------------------------------------------------------- interaction injection

    def _resolve_member(self, guild: FakeGuild, user: FakeUser | FakeMember | int | None) -> FakeMember:
        if isinstance(user, FakeMember):
            return user
        if user is None:
            return next(m for m in guild.members if not m.user.bot)
        user_id = user.id if isinstance(user, FakeUser) else int(user)
        member = guild.member(user_id)
        if member is not None:
            return member
        # Interacting implies membership; add the user rather than failing the test setup.
        found = self.users.get(user_id)
        if found is None:
            raise KeyError(f"unknown user {user_id}")
        return self.add_member(guild, found)

    def _base_interaction(
        self,
        interaction_type: int,
        data: dict[str, Any],
        *,
        user: FakeUser | FakeMember | int | None,
        guild: FakeGuild | int | None,
        channel: FakeChannel | int | None,
        dm: bool,
        locale: str,
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "id": str(self.new_id()),
            "application_id": str(self.application_id),
            "type": interaction_type,
            "data": data,
            "token": "fake-itoken-" + secrets.token_urlsafe(24),
            "version": 1,
            "locale": locale,
            "entitlements": [],
            "entitlement_sku_ids": [],
            "attachment_size_limit": self.attachment_size_limit,
        }
        if dm:
            if isinstance(user, FakeMember):
                the_user = user.user
            elif isinstance(user, FakeUser):
                the_user = user
            elif user is None:
                the_user = self.user
            else:
                the_user = self.users[int(user)]
            dm_channel = self._dm_channel(the_user)
            payload.update(
                {
                    "user": the_user.to_payload(),
                    "channel_id": str(dm_channel.id),
                    "channel": dm_channel.to_payload(),
                    "context": 1,
                    "authorizing_integration_owners": {"0": str(the_user.id)},
                    "app_permissions": str(EVERYONE_PERMISSIONS),
                }
            )
            return payload

        if isinstance(guild, FakeGuild):
            the_guild = guild
        else:
            found_guild = self.guild if guild is None else self._guild_by_id(int(guild))
            if found_guild is None:
                raise KeyError(f"unknown guild {guild}")
            the_guild = found_guild
        member = self._resolve_member(the_guild, user)
        if isinstance(channel, FakeChannel):
            the_channel = channel
        elif channel is None:
            the_channel = next(c for c in the_guild.channels if c.type == 0)
        else:
            found_channel = the_guild.channel(int(channel))
            if found_channel is None:
                raise KeyError(f"unknown channel {channel} in guild {the_guild.id}")
            the_channel = found_channel
        member_permissions = the_guild.permissions_of(member)
        bot_member = the_guild.member(self.bot_user.id)
        app_permissions = the_guild.permissions_of(bot_member) if bot_member else EVERYONE_PERMISSIONS
        channel_payload = the_channel.to_payload()
        channel_payload["permissions"] = str(member_permissions)
        payload.update(
            {
                "guild_id": str(the_guild.id),
                "guild": {"id": str(the_guild.id), "locale": the_guild.locale, "features": []},
                "guild_locale": the_guild.locale,
                "channel_id": str(the_channel.id),
                "channel": channel_payload,
                "member": member.to_payload(permissions=member_permissions),
                "app_permissions": str(app_permissions),
                "context": 0,
                "authorizing_integration_owners": {"0": str(the_guild.id)},
            }
        )
        return payload

    async def _inject(self, payload: dict[str, Any]) -> FakeInteraction:
        interaction = FakeInteraction(self, payload)
        self.interactions[interaction.token] = interaction
        await self.send_dispatch("INTERACTION_CREATE", payload)
        # The 3 s ack window starts when the client can see the interaction, not when the test
        # waited for a connection.
        interaction.created_at = self.now()
        return interaction

    def upload_attachment(
        self, filename: str, data: bytes, content_type: str | None = None, *, channel_id: int | None = None
    ) -> dict[str, Any]:
        """Store bytes as an attachment and return its object (for attachment options, type 11)."""
        return self._make_attachment(
            channel_id or self.channel.id,
            RecordedFile(filename=filename, content_type=content_type or "", data=data),
            {},
        )

    def _option_payload(
        self, name: str, value: Any, schema: dict[str, Any] | None, resolved: dict[str, dict[str, Any]]
    ) -> dict[str, Any]:
        option_type = schema.get("type") if schema else None
        if option_type is None:
            if isinstance(value, bool):
                option_type = 5
            elif isinstance(value, int):
                option_type = 4
            elif isinstance(value, float):
                option_type = 10
            elif isinstance(value, FakeUser | FakeMember):
                option_type = 6
            elif isinstance(value, FakeChannel):
                option_type = 7
            elif isinstance(value, FakeRole):
                option_type = 8
            elif isinstance(value, dict) and "filename" in value:
                option_type = 11
            else:
                option_type = 3
        if option_type == 6:
            user = value.user if isinstance(value, FakeMember) else value
            user = user if isinstance(user, FakeUser) else self.users[int(user)]
            resolved.setdefault("users", {})[str(user.id)] = user.to_payload()
            member = next((g.member(user.id) for g in self.guilds if g.member(user.id)), None)
            if member is not None:
                member_payload = member.to_payload()
                member_payload.pop("user")
                resolved.setdefault("members", {})[str(user.id)] = member_payload
            value = str(user.id)
        elif option_type == 7:
            channel = value if isinstance(value, FakeChannel) else self._channel_by_id(int(value))
            if channel is None:
                raise KeyError(f"unknown channel {value}")
            channel_payload = channel.to_payload()
            channel_payload["permissions"] = str(ALL_PERMISSIONS)
            resolved.setdefault("channels", {})[str(channel.id)] = channel_payload
            value = str(channel.id)
        elif option_type == 8:
            role = value if isinstance(value, FakeRole) else None
            if role is None:
                role = next((g.role(int(value)) for g in self.guilds if g.role(int(value))), None)
            if role is None:
                raise KeyError(f"unknown role {value}")
            resolved.setdefault("roles", {})[str(role.id)] = role.to_payload()
            value = str(role.id)
        elif option_type == 11:
            attachment = value if isinstance(value, dict) else None
            if attachment is None:
                raise TypeError("attachment options take the dict from upload_attachment()")
            resolved.setdefault("attachments", {})[attachment["id"]] = attachment
            value = attachment["id"]
        return {"name": name, "type": option_type, "value": value}

    async def slash(
        self,
        name: str,
        options: Mapping[str, Any] | Sequence[dict[str, Any]] | None = None,
        *,
        user: FakeUser | FakeMember | int | None = None,
        guild: FakeGuild | int | None = None,
        channel: FakeChannel | int | None = None,
        subcommand: str | None = None,
        dm: bool = False,
        locale: str = "en-US",
    ) -> FakeInteraction:
        """Inject a chat-input command (INTERACTION_CREATE type 2) and return it.

        ``options`` is ``{name: value}`` (types taken from the synced command, else inferred from
        the value: bool/int/float/str, :class:`FakeUser`/:class:`FakeMember` (6), :class:`FakeChannel`
        (7), :class:`FakeRole` (8), a dict from :meth:`upload_attachment` (11)) or a raw list of
        option payloads. ``subcommand`` is ``"sub"`` or ``"group sub"``. If the command was synced to
        the guild, ``data.guild_id`` is set so discord.py looks in its guild commands. ``dm=True``
        sends it from the user's DM channel.
        """
        guild_id: int | None = None
        if not dm:
            guild_id = guild.id if isinstance(guild, FakeGuild) else (int(guild) if guild else self.guild.id)
        command = self._find_command(name, guild_id)
        schema_options: list[dict[str, Any]] = list(command.get("options") or []) if command else []
        chain = subcommand.split() if subcommand else []
        for part in chain:
            parent = next((o for o in schema_options if o.get("name") == part), None)
            schema_options = list(parent.get("options") or []) if parent else []

        resolved: dict[str, dict[str, Any]] = {}
        if options is None:
            option_payloads: list[dict[str, Any]] = []
        elif isinstance(options, Mapping):
            option_payloads = [
                self._option_payload(
                    key, value, next((o for o in schema_options if o.get("name") == key), None), resolved
                )
                for key, value in options.items()
            ]
        else:
            option_payloads = [dict(o) for o in options]
        # Wrap innermost-first: "group sub" -> [{group, type 2, options: [{sub, type 1, options}]}].
        for depth, part in reversed(list(enumerate(chain))):
            kind = 1 if depth == len(chain) - 1 else 2
            option_payloads = [{"name": part, "type": kind, "options": option_payloads}]

        data: dict[str, Any] = {
            "id": command["id"] if command else str(self.new_id()),
            "name": name,
            "type": 1,
            "options": option_payloads,
        }
        if resolved:
            data["resolved"] = resolved
        if command is not None and command.get("guild_id"):
            data["guild_id"] = command["guild_id"]
        payload = self._base_interaction(
            INTERACTION_APPLICATION_COMMAND,
            data,
            user=user,
            guild=guild,
            channel=channel,
            dm=dm,
            locale=locale,
        )
        return await self._inject(payload)

    async def press(
        self,
        custom_id: str,
        message: dict[str, Any] | int | str,
        *,
        user: FakeUser | FakeMember | int | None = None,
        values: Sequence[str] | None = None,
        locale: str = "en-US",
    ) -> FakeInteraction:
        """Inject a component interaction (type 3) for ``custom_id`` on a stored ``message``.

        The interaction carries the message's *current* stored state (discord.py ignores a
        ``DynamicItem`` press unless the message's components contain the custom_id), and
        ``component_type`` is taken from that component. ``values`` are for select menus.
        Raises ``ValueError`` if the message has no component with that custom_id.
        """
        message_id = message["id"] if isinstance(message, dict) else message
        stored = self.get_message(message_id)
        if stored is None:
            if not isinstance(message, dict):
                raise KeyError(f"unknown message {message_id}")
            stored = message
        component = next(
            (c for c in _walk_components(stored.get("components") or []) if c.get("custom_id") == custom_id),
            None,
        )
        if component is None:
            raise ValueError(f"message {message_id} has no component with custom_id {custom_id!r}")
        data: dict[str, Any] = {"custom_id": custom_id, "component_type": component.get("type", 2)}
        if values is not None:
            data["values"] = list(values)
        if component.get("id") is not None:
            data["id"] = component["id"]
        channel_id = int(stored["channel_id"])
        dm = stored.get("guild_id") is None
        payload = self._base_interaction(
            INTERACTION_COMPONENT,
            data,
            user=user,
            guild=None if dm else int(stored["guild_id"]),
            channel=None if dm else channel_id,
            dm=dm,
            locale=locale,
        )
        payload["message"] = copy.deepcopy(stored)
        return await self._inject(payload)

    async def submit_modal(
        self,
        custom_id: str,
        values: Mapping[str, str],
        *,
        user: FakeUser | FakeMember | int | None = None,
        message: dict[str, Any] | None = None,
        guild: FakeGuild | int | None = None,
        channel: FakeChannel | int | None = None,
        locale: str = "en-US",
    ) -> FakeInteraction:
        """Inject a modal submit (type 5): ``values`` maps text input custom_ids to their text.

        discord.py only dispatches it if the bot has sent a modal with that ``custom_id``
        (its modal store is keyed by custom_id alone; the user is not checked).
        """
        rows = [
            {"type": 1, "components": [{"type": 4, "custom_id": key, "value": value}]}
            for key, value in values.items()
        ]
        data: dict[str, Any] = {"custom_id": custom_id, "components": rows}
        stored = (self.get_message(message["id"]) or message) if message is not None else None
        # A modal opened from a button in a DM is submitted in that DM, as Discord does.
        dm = stored is not None and stored.get("guild_id") is None
        payload = self._base_interaction(
            INTERACTION_MODAL_SUBMIT,
            data,
            user=user,
            guild=None if dm else guild,
            channel=None if dm else channel,
            dm=dm,
            locale=locale,
        )
        if stored is not None:
            payload["message"] = copy.deepcopy(stored)
        return await self._inject(payload)

    # ---------------------------------------------------------------------------- messages

    def _make_attachment(
        self, channel_id: int, upload: RecordedFile, meta: Mapping[str, Any]
    ) -> dict[str, Any]:
        attachment_id = self.new_id()
        filename = upload.filename or "unknown"
        content_type = mimetypes.guess_type(filename)[0] or upload.content_type or "application/octet-stream"
        self._files[attachment_id] = (filename, content_type, upload.data)
        url = f"{self.base_url}/attachments/{channel_id}/{attachment_id}/{filename}"
        attachment: dict[str, Any] = {
            "id": str(attachment_id),
            "filename": filename,
            "size": len(upload.data),
            "url": url,
            "proxy_url": url,
            "content_type": content_type,
        }
        if meta.get("description"):
            attachment["description"] = meta["description"]
        if content_type.startswith("image/"):
            size = _image_size(upload.data)
            if size is not None:
                attachment["width"], attachment["height"] = size
        return attachment

    def _attachments_for(
        self,
        channel_id: int,
        payload: Mapping[str, Any],
        files: Sequence[RecordedFile],
        existing: Sequence[dict[str, Any]],
    ) -> list[dict[str, Any]]:
        """Discord's rule: ``attachments`` lists what the message keeps (existing by id, new files
        by their ``files[n]`` index); without it, new files are added to the existing ones."""
        uploads: dict[int, RecordedFile] = {}
        for index, upload in enumerate(files):
            indexed = re.fullmatch(r"files\[(\d+)\]", upload.field)
            # Other field names (other clients) fall back to the upload order.
            uploads[int(indexed.group(1)) if indexed else index] = upload
        listed = payload.get("attachments")
        if listed is None:
            return [*existing, *(self._make_attachment(channel_id, f, {}) for f in files)]
        by_id = {a["id"]: a for a in existing}
        result = []
        for entry in listed:
            key = str(entry.get("id"))
            if key in by_id:
                result.append(by_id[key])
            elif key.isdigit() and int(key) in uploads:
                result.append(self._make_attachment(channel_id, uploads[int(key)], entry))
        return result

    def _new_message(
        self,
        *,
        channel_id: int,
        payload: Mapping[str, Any],
        files: Sequence[RecordedFile],
        message_type: int = 0,
        flags: int = 0,
        interaction: FakeInteraction | None = None,
    ) -> dict[str, Any]:
        channel = self._channel_by_id(channel_id)
        message_id = self.new_id()
        message: dict[str, Any] = {
            "id": str(message_id),
            "channel_id": str(channel_id),
            "type": message_type,
            "content": payload.get("content") or "",
            "author": self.bot_user.to_payload(),
            "embeds": list(payload.get("embeds") or []),
            "components": list(payload.get("components") or []),
            "attachments": self._attachments_for(channel_id, payload, files, []),
            "mentions": [],
            "mention_roles": [],
            "mention_everyone": False,
            "pinned": False,
            "tts": bool(payload.get("tts", False)),
            "timestamp": _iso(snowflake_time(message_id)),
            "edited_timestamp": None,
            "flags": flags | (int(payload.get("flags") or 0) & (COMPONENTS_V2 | (1 << 2) | (1 << 12))),
        }
        if channel is not None and channel.guild_id is not None:
            message["guild_id"] = str(channel.guild_id)
        if payload.get("message_reference"):
            message["message_reference"] = payload["message_reference"]
            message["type"] = 19
        if interaction is not None:
            message["webhook_id"] = str(self.application_id)
            message["application_id"] = str(self.application_id)
            metadata: dict[str, Any] = {
                "id": str(interaction.id),
                "type": interaction.type,
                "user": interaction.user,
                "authorizing_integration_owners": interaction.payload.get(
                    "authorizing_integration_owners", {}
                ),
            }
            if interaction.command_name:
                metadata["name"] = interaction.command_name
                metadata["command_type"] = 1
            if interaction.message_id is not None:
                metadata["interacted_message_id"] = str(interaction.message_id)
            if interaction.original_message_id is not None:
                metadata["original_response_message_id"] = str(interaction.original_message_id)
            message["interaction_metadata"] = metadata
        self.messages.append(message)
        self._messages_by_id[message_id] = message
        return message

    def _edit_message(
        self, message: dict[str, Any], payload: Mapping[str, Any], files: Sequence[RecordedFile]
    ) -> dict[str, Any]:
        if "content" in payload:
            message["content"] = payload["content"] or ""
        if "embeds" in payload:
            message["embeds"] = list(payload["embeds"] or [])
        if "components" in payload:
            message["components"] = list(payload["components"] or [])
        if "attachments" in payload or files:
            message["attachments"] = self._attachments_for(
                int(message["channel_id"]), payload, files, message["attachments"]
            )
        if payload.get("flags") is not None:
            # Only SUPPRESS_EMBEDS (and the v2 flag) can change on edit; ephemeral is fixed.
            keep = int(message["flags"]) & ~((1 << 2) | COMPONENTS_V2)
            message["flags"] = keep | (int(payload["flags"]) & ((1 << 2) | COMPONENTS_V2))
        # An edit (or first followup) is what turns a "thinking…" message into a real one.
        message["flags"] = int(message["flags"]) & ~LOADING
        message["edited_timestamp"] = _iso()
        return message

    def _delete_message(self, message: dict[str, Any]) -> None:
        message_id = int(message["id"])
        self._messages_by_id.pop(message_id, None)
        self.messages = [m for m in self.messages if m is not message]
        self.deleted_message_ids.append(message_id)

    def _validate_message(self, payload: Mapping[str, Any], files: Sequence[RecordedFile]) -> None:
        for upload in files:
            if len(upload.data) > self.attachment_size_limit:
                raise _ApiError(413, 40005, "Request entity too large")
        errors: dict[str, Any] = {}
        if len(files) > 10:
            errors["files"] = _form_error("BASE_TYPE_MAX_LENGTH", "Must be 10 or fewer in length.")
        content = payload.get("content")
        if isinstance(content, str) and len(content) > 2000:
            errors["content"] = _form_error("BASE_TYPE_MAX_LENGTH", "Must be 2000 or fewer in length.")
        if len(payload.get("embeds") or []) > 10:
            errors["embeds"] = _form_error("BASE_TYPE_MAX_LENGTH", "Must be 10 or fewer in length.")
        components = payload.get("components") or []
        v2 = bool(int(payload.get("flags") or 0) & COMPONENTS_V2)
        if not v2 and len(components) > 5:
            errors["components"] = _form_error("BASE_TYPE_MAX_LENGTH", "Must be 5 or fewer in length.")
        seen: set[str] = set()

        def walk(items: Sequence[Any], path: list[str]) -> None:
            for index, component in enumerate(items):
                if not isinstance(component, dict):
                    continue
                here = [*path, str(index)]
                children = component.get("components") or []
                if not v2 and component.get("type") == 1 and len(children) > 5:
                    _set_nested(
                        errors,
                        [*here, "components"],
                        _form_error("BASE_TYPE_MAX_LENGTH", "Must be 5 or fewer in length."),
                    )
                custom_id = component.get("custom_id")
                if custom_id is not None:
                    if len(custom_id) > 100:
                        _set_nested(
                            errors,
                            [*here, "custom_id"],
                            _form_error("BASE_TYPE_MAX_LENGTH", "Must be 100 or fewer in length."),
                        )
                    elif custom_id in seen:
                        _set_nested(
                            errors,
                            [*here, "custom_id"],
                            _form_error(
                                "COMPONENT_CUSTOM_ID_DUPLICATED", "Component custom id cannot be duplicated"
                            ),
                        )
                    seen.add(custom_id)
                walk(children, [*here, "components"])
                for key in ("component", "accessory"):
                    if isinstance(component.get(key), dict):
                        walk([component[key]], [*here, key])

        walk(components, ["components"])
        if errors:
            raise _ApiError(400, 50035, "Invalid Form Body", errors=errors)

    # ---------------------------------------------------------------------------- HTTP plumbing

    def _build_routes(self) -> list[_Route]:
        snow = r"(?P<{}>\d+)"
        token = r"(?P<token>[^/]+)"
        table: list[tuple[str, str, str, _Handler, bool, str | None]] = [
            ("GET", r"/users/@me", "get_me", self._h_get_me, True, None),
            ("GET", r"/users/" + snow.format("user_id"), "get_user", self._h_get_user, True, None),
            ("POST", r"/users/@me/channels", "create_dm", self._h_create_dm, True, None),
            ("GET", r"/oauth2/applications/@me", "application_info", self._h_app_info, True, None),
            ("GET", r"/applications/@me", "application_info", self._h_app_info, True, None),
            ("GET", r"/gateway", "get_gateway", self._h_gateway, False, None),
            ("GET", r"/gateway/bot", "get_gateway_bot", self._h_gateway_bot, True, None),
            (
                "GET",
                r"/applications/(?P<app_id>\d+)/commands",
                "get_commands",
                self._h_get_commands,
                True,
                None,
            ),
            (
                "PUT",
                r"/applications/(?P<app_id>\d+)/commands",
                "put_commands",
                self._h_put_commands,
                True,
                None,
            ),
            (
                "GET",
                r"/applications/(?P<app_id>\d+)/guilds/(?P<guild_id>\d+)/commands",
                "get_commands",
                self._h_get_commands,
                True,
                None,
            ),
            (
                "PUT",
                r"/applications/(?P<app_id>\d+)/guilds/(?P<guild_id>\d+)/commands",
                "put_commands",
                self._h_put_commands,
                True,
                None,
            ),
            (
                "POST",
                r"/interactions/(?P<interaction_id>\d+)/" + token + r"/callback",
                "interaction_callback",
                self._h_callback,
                False,
                "token",
            ),
            (
                "POST",
                r"/webhooks/(?P<app_id>\d+)/" + token,
                "webhook_execute",
                self._h_webhook_execute,
                False,
                "token",
            ),
            (
                "GET",
                r"/webhooks/(?P<app_id>\d+)/" + token + r"/messages/(?P<message_id>@original|\d+)",
                "webhook_message_get",
                self._h_webhook_get,
                False,
                "token",
            ),
            (
                "PATCH",
                r"/webhooks/(?P<app_id>\d+)/" + token + r"/messages/(?P<message_id>@original|\d+)",
                "webhook_message_edit",
                self._h_webhook_edit,
                False,
                "token",
            ),
            (
                "DELETE",
                r"/webhooks/(?P<app_id>\d+)/" + token + r"/messages/(?P<message_id>@original|\d+)",
                "webhook_message_delete",
                self._h_webhook_delete,
                False,
                "token",
            ),
            ("GET", r"/channels/(?P<channel_id>\d+)", "get_channel", self._h_get_channel, True, None),
            (
                "GET",
                r"/channels/(?P<channel_id>\d+)/messages",
                "channel_messages",
                self._h_channel_messages,
                True,
                None,
            ),
            (
                "POST",
                r"/channels/(?P<channel_id>\d+)/messages",
                "channel_message_create",
                self._h_channel_message_create,
                True,
                None,
            ),
            (
                "GET",
                r"/channels/(?P<channel_id>\d+)/messages/(?P<message_id>\d+)",
                "channel_message_get",
                self._h_channel_message_get,
                True,
                None,
            ),
            (
                "PATCH",
                r"/channels/(?P<channel_id>\d+)/messages/(?P<message_id>\d+)",
                "channel_message_edit",
                self._h_channel_message_edit,
                True,
                None,
            ),
            (
                "DELETE",
                r"/channels/(?P<channel_id>\d+)/messages/(?P<message_id>\d+)",
                "channel_message_delete",
                self._h_channel_message_delete,
                True,
                None,
            ),
            ("POST", r"/channels/(?P<channel_id>\d+)/typing", "typing", self._h_no_content, True, None),
            (
                "PUT",
                r"/channels/(?P<channel_id>\d+)/messages/(?P<message_id>\d+)/reactions/[^/]+/@me",
                "add_reaction",
                self._h_no_content,
                True,
                None,
            ),
            ("GET", r"/guilds/(?P<guild_id>\d+)", "get_guild", self._h_get_guild, True, None),
            (
                "GET",
                r"/guilds/(?P<guild_id>\d+)/channels",
                "get_guild_channels",
                self._h_guild_channels,
                True,
                None,
            ),
            ("GET", r"/guilds/(?P<guild_id>\d+)/roles", "get_guild_roles", self._h_guild_roles, True, None),
            (
                "GET",
                r"/guilds/(?P<guild_id>\d+)/members",
                "get_guild_members",
                self._h_guild_members,
                True,
                None,
            ),
            (
                "GET",
                r"/guilds/(?P<guild_id>\d+)/members/(?P<user_id>\d+)",
                "get_guild_member",
                self._h_guild_member,
                True,
                None,
            ),
        ]
        return [
            _Route(method, re.compile(f"^{pattern}$"), name, handler, auth, group)
            for method, pattern, name, handler, auth, group in table
        ]

    async def _read_body(self, request: web.Request) -> tuple[Any, list[RecordedFile]]:
        content_type = request.headers.get("Content-Type", "")
        if content_type.startswith("multipart/"):
            payload: Any = None
            files: list[RecordedFile] = []
            reader = await request.multipart()
            async for part in reader:
                if not isinstance(part, aiohttp.BodyPartReader):
                    continue
                if part.name == "payload_json":
                    payload = json.loads(await part.text())
                elif part.filename is not None:
                    files.append(
                        RecordedFile(
                            filename=part.filename,
                            content_type=part.headers.get("Content-Type", ""),
                            data=bytes(await part.read(decode=False)),
                            field=part.name or "",
                        )
                    )
            return payload, files
        raw = await request.read()
        if not raw:
            return None, []
        try:
            return json.loads(raw), []
        except ValueError:
            return raw.decode("utf-8", "replace"), []

    async def _http_handler(self, request: web.Request) -> web.StreamResponse:
        match = _API_PREFIX.match(request.path)
        path = (match.group("rest") or "/") if match else request.path
        body, files = await self._read_body(request)
        record = RecordedRequest(
            method=request.method,
            path=path,
            query=dict(request.query),
            json=body,
            files=files,
            headers=CIMultiDict(request.headers),
            api_version=int(match.group("version")) if match else None,
        )
        try:
            response = await self._route(request, record, is_api=match is not None)
        except _ApiError as exc:
            response = _json_response(exc.status, exc.body)
            record.response = exc.body
        record.status = response.status
        self.requests.append(record)
        await self._notify()
        return response

    async def _route(self, request: web.Request, record: RecordedRequest, *, is_api: bool) -> web.Response:
        if not is_api:
            return self._serve_attachment(record)
        for route in self._routes:
            if route.method != request.method:
                continue
            found = route.pattern.match(record.path)
            if found is None:
                continue
            record.route = route.name
            if route.token_group:
                record.interaction_token = found.group(route.token_group)
            for rule in self._failures:
                if rule.matches(request.method, record.path):
                    rule.hits += 1
                    record.response = rule.body
                    return _json_response(rule.status, rule.body, rule.headers)
            if route.auth and not self._token_ok(_bot_token(request.headers.get("Authorization"))):
                raise _ApiError(401, 0, "401: Unauthorized")
            result = await route.handler(_Ctx(request, record, found))
            if isinstance(result, web.Response):
                return result
            status, body = result
            record.response = body
            if status == 204:
                return web.Response(status=204)
            return _json_response(status, body)
        for rule in self._failures:
            if rule.matches(request.method, record.path):
                rule.hits += 1
                record.response = rule.body
                return _json_response(rule.status, rule.body, rule.headers)
        raise _ApiError(404, 0, "404: Not Found")

    def _serve_attachment(self, record: RecordedRequest) -> web.Response:
        found = re.fullmatch(r"/attachments/\d+/(\d+)/[^/]+", record.path)
        record.route = "attachment_download"
        stored = self._files.get(int(found.group(1))) if found else None
        if stored is None:
            raise _ApiError(404, 0, "404: Not Found")
        _, content_type, data = stored
        return web.Response(status=200, body=data, headers={"Content-Type": content_type})

    # ---------------------------------------------------------------------------- REST handlers

    async def _h_no_content(self, ctx: _Ctx) -> tuple[int, Any]:
        return 204, None

    async def _h_get_me(self, ctx: _Ctx) -> tuple[int, Any]:
        return 200, {**self.bot_user.to_payload(), "verified": True, "mfa_enabled": False, "locale": "en-US"}

    async def _h_get_user(self, ctx: _Ctx) -> tuple[int, Any]:
        user = self.users.get(ctx.int_param("user_id"))
        if user is None:
            raise _ApiError(404, 10013, "Unknown User")
        return 200, user.to_payload()

    async def _h_create_dm(self, ctx: _Ctx) -> tuple[int, Any]:
        user = self.users.get(int(ctx.body.get("recipient_id") or 0))
        if user is None:
            raise _ApiError(400, 50035, "Invalid Form Body")
        return 200, self._dm_channel(user).to_payload()

    async def _h_app_info(self, ctx: _Ctx) -> tuple[int, Any]:
        owner = self.owner
        return 200, {
            "id": str(self.application_id),
            "name": self.bot_user.username,
            "icon": None,
            "description": "Fake application",
            "rpc_origins": [],
            "bot_public": True,
            "bot_require_code_grant": False,
            "bot": self.bot_user.to_payload(),
            "terms_of_service_url": None,
            "privacy_policy_url": None,
            "owner": owner.to_payload(),
            "verify_key": secrets.token_hex(32),
            "team": None,
            "guild_id": None,
            "primary_sku_id": None,
            "slug": None,
            "cover_image": None,
            "flags": 0,
            "approximate_guild_count": len(self.guilds),
            "approximate_user_install_count": 0,
            "redirect_uris": [],
            "interactions_endpoint_url": None,
            "role_connections_verification_url": None,
            "tags": [],
            "install_params": None,
            "integration_types_config": {"0": {}},
            "custom_install_url": None,
        }

    async def _h_gateway(self, ctx: _Ctx) -> tuple[int, Any]:
        return 200, {"url": self.gateway_url}

    async def _h_gateway_bot(self, ctx: _Ctx) -> tuple[int, Any]:
        return 200, {
            "url": self.gateway_url,
            "shards": 1,
            "session_start_limit": {"total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": 1},
        }

    def _check_app(self, ctx: _Ctx) -> int | None:
        if ctx.int_param("app_id") != self.application_id:
            raise _ApiError(404, 10002, "Unknown Application")
        guild_id = ctx.match.groupdict().get("guild_id")
        return int(guild_id) if guild_id else None

    async def _h_get_commands(self, ctx: _Ctx) -> tuple[int, Any]:
        return 200, self.commands(self._check_app(ctx))

    async def _h_put_commands(self, ctx: _Ctx) -> tuple[int, Any]:
        guild_id = self._check_app(ctx)
        if not isinstance(ctx.record.json, list):
            raise _ApiError(400, 50035, "Invalid Form Body")
        return 200, self._store_commands(guild_id, ctx.record.json)

    # Interaction callbacks -------------------------------------------------------------------

    async def _h_callback(self, ctx: _Ctx) -> tuple[int, Any]:
        interaction = self.interactions.get(ctx.param("token"))
        if (
            interaction is None
            or interaction.id != ctx.int_param("interaction_id")
            or not interaction.is_token_valid()
        ):
            raise _ApiError(404, 10062, "Unknown interaction")
        if interaction.response_type is not None:
            raise _ApiError(400, 40060, "Interaction has already been acknowledged.")
        late = self.ack_deadline is not None and self.now() - interaction.created_at > self.ack_deadline
        if late:
            raise _ApiError(404, 10062, "Unknown interaction")
        body = ctx.body
        callback_type = body.get("type")
        data: dict[str, Any] = body.get("data") or {}
        files = ctx.record.files
        resource: dict[str, Any] | None = None

        if (
            callback_type in (CALLBACK_DEFERRED_UPDATE, CALLBACK_UPDATE_MESSAGE)
            and interaction.message_id is None
        ):
            raise _ApiError(
                400, 50035, "Invalid Form Body", errors={"type": _form_error("INTERACTION_TYPE", "bad")}
            )
        if callback_type in (CALLBACK_MESSAGE, CALLBACK_UPDATE_MESSAGE):
            self._validate_message(data, files)
        if callback_type not in (
            CALLBACK_PONG,
            CALLBACK_MESSAGE,
            CALLBACK_DEFERRED_MESSAGE,
            CALLBACK_DEFERRED_UPDATE,
            CALLBACK_UPDATE_MESSAGE,
            CALLBACK_AUTOCOMPLETE,
            CALLBACK_MODAL,
        ):
            raise _ApiError(
                400, 50035, "Invalid Form Body", errors={"type": _form_error("BASE_TYPE_CHOICES", "bad")}
            )

        interaction.response_type = callback_type
        message_type = 20 if interaction.type == INTERACTION_APPLICATION_COMMAND else 0
        flags = int(data.get("flags") or 0) & EPHEMERAL
        if callback_type == CALLBACK_MESSAGE:
            message = self._new_message(
                channel_id=interaction.channel_id,
                payload=data,
                files=files,
                message_type=message_type,
                flags=flags,
                interaction=interaction,
            )
            interaction.original_message_id = int(message["id"])
            resource = message
        elif callback_type == CALLBACK_DEFERRED_MESSAGE:
            message = self._new_message(
                channel_id=interaction.channel_id,
                payload={},
                files=[],
                message_type=message_type,
                flags=flags | LOADING,
                interaction=interaction,
            )
            interaction.original_message_id = int(message["id"])
            interaction.loading = True
            resource = message
        elif callback_type in (CALLBACK_DEFERRED_UPDATE, CALLBACK_UPDATE_MESSAGE):
            assert interaction.message_id is not None
            interaction.original_message_id = interaction.message_id
            target = self.get_message(interaction.message_id)
            if callback_type == CALLBACK_UPDATE_MESSAGE and target is not None:
                resource = self._edit_message(target, data, files)
        elif callback_type == CALLBACK_MODAL:
            interaction.modal = data
        elif callback_type == CALLBACK_AUTOCOMPLETE:
            interaction.autocomplete_choices = list(data.get("choices") or [])

        if ctx.request.query.get("with_response", "").lower() not in ("1", "true"):
            return 204, None
        original = (
            self.get_message(interaction.original_message_id) if interaction.original_message_id else None
        )
        response: dict[str, Any] = {
            "interaction": {
                "id": str(interaction.id),
                "type": interaction.type,
                "response_message_id": str(interaction.original_message_id)
                if interaction.original_message_id
                else None,
                "response_message_loading": interaction.loading,
                "response_message_ephemeral": bool(original and int(original["flags"]) & EPHEMERAL),
            }
        }
        if resource is not None:
            response["resource"] = {"type": callback_type, "message": copy.deepcopy(resource)}
        return 200, response

    # Webhooks (followups and @original) --------------------------------------------------------

    def _webhook_interaction(self, ctx: _Ctx) -> FakeInteraction:
        if ctx.int_param("app_id") != self.application_id:
            raise _ApiError(404, 10015, "Unknown Webhook")
        interaction = self.interactions.get(ctx.param("token"))
        if interaction is None or not interaction.is_token_valid():
            raise _ApiError(401, 50027, "Invalid Webhook Token")
        return interaction

    def _webhook_message(self, ctx: _Ctx, interaction: FakeInteraction) -> dict[str, Any]:
        raw_id = ctx.param("message_id")
        message_id = interaction.original_message_id if raw_id == "@original" else int(raw_id)
        message = self.get_message(message_id) if message_id is not None else None
        if message is None or message.get("webhook_id", str(self.application_id)) != str(self.application_id):
            raise _ApiError(404, 10008, "Unknown Message")
        if message["author"]["id"] != str(self.bot_user.id):
            raise _ApiError(404, 10008, "Unknown Message")
        return message

    async def _h_webhook_execute(self, ctx: _Ctx) -> tuple[int, Any]:
        interaction = self._webhook_interaction(ctx)
        if interaction.response_type is None:
            # Followups need an acknowledged interaction.
            raise _ApiError(404, 10015, "Unknown Webhook")
        payload = ctx.body
        files = ctx.record.files
        self._validate_message(payload, files)
        original = (
            self.get_message(interaction.original_message_id) if interaction.original_message_id else None
        )
        if interaction.loading and original is not None and int(original["flags"]) & LOADING:
            # Discord: the first followup after a deferred response replaces "thinking…".
            interaction.loading = False
            message = self._edit_message(original, payload, files)
        else:
            if not (payload.get("content") or payload.get("embeds") or files or payload.get("components")):
                raise _ApiError(400, 50006, "Cannot send an empty message")
            message = self._new_message(
                channel_id=interaction.channel_id,
                payload=payload,
                files=files,
                flags=int(payload.get("flags") or 0) & EPHEMERAL,
                interaction=interaction,
            )
        if ctx.request.query.get("wait", "").lower() not in ("1", "true"):
            return 204, None
        return 200, copy.deepcopy(message)

    async def _h_webhook_get(self, ctx: _Ctx) -> tuple[int, Any]:
        interaction = self._webhook_interaction(ctx)
        return 200, copy.deepcopy(self._webhook_message(ctx, interaction))

    async def _h_webhook_edit(self, ctx: _Ctx) -> tuple[int, Any]:
        interaction = self._webhook_interaction(ctx)
        message = self._webhook_message(ctx, interaction)
        self._validate_message(ctx.body, ctx.record.files)
        if int(message["id"]) == interaction.original_message_id:
            interaction.loading = False
        return 200, copy.deepcopy(self._edit_message(message, ctx.body, ctx.record.files))

    async def _h_webhook_delete(self, ctx: _Ctx) -> tuple[int, Any]:
        interaction = self._webhook_interaction(ctx)
        self._delete_message(self._webhook_message(ctx, interaction))
        return 204, None

    # Channels -----------------------------------------------------------------------------------

    def _channel(self, ctx: _Ctx) -> FakeChannel:
        channel = self._channel_by_id(ctx.int_param("channel_id"))
        if channel is None:
            raise _ApiError(404, 10003, "Unknown Channel")
        return channel

    def _channel_message(self, ctx: _Ctx) -> dict[str, Any]:
        channel = self._channel(ctx)
        message = self.get_message(ctx.int_param("message_id"))
        # Ephemeral messages only exist for their interaction's webhook, not the channel API.
        if message is None or int(message["channel_id"]) != channel.id or int(message["flags"]) & EPHEMERAL:
            raise _ApiError(404, 10008, "Unknown Message")
        return message

    async def _h_get_channel(self, ctx: _Ctx) -> tuple[int, Any]:
        return 200, self._channel(ctx).to_payload()

    async def _h_channel_messages(self, ctx: _Ctx) -> tuple[int, Any]:
        channel = self._channel(ctx)
        limit = int(ctx.request.query.get("limit", "50"))
        found = [
            m for m in self.messages if int(m["channel_id"]) == channel.id and not int(m["flags"]) & EPHEMERAL
        ]
        return 200, copy.deepcopy(list(reversed(found))[:limit])

    async def _h_channel_message_create(self, ctx: _Ctx) -> tuple[int, Any]:
        channel = self._channel(ctx)
        payload, files = ctx.body, ctx.record.files
        self._validate_message(payload, files)
        if not (payload.get("content") or payload.get("embeds") or files or payload.get("components")):
            raise _ApiError(400, 50006, "Cannot send an empty message")
        message = self._new_message(channel_id=channel.id, payload=payload, files=files)
        return 200, copy.deepcopy(message)

    async def _h_channel_message_get(self, ctx: _Ctx) -> tuple[int, Any]:
        return 200, copy.deepcopy(self._channel_message(ctx))

    async def _h_channel_message_edit(self, ctx: _Ctx) -> tuple[int, Any]:
        message = self._channel_message(ctx)
        if message["author"]["id"] != str(self.bot_user.id):
            raise _ApiError(403, 50005, "Cannot edit a message authored by another user")
        self._validate_message(ctx.body, ctx.record.files)
        return 200, copy.deepcopy(self._edit_message(message, ctx.body, ctx.record.files))

    async def _h_channel_message_delete(self, ctx: _Ctx) -> tuple[int, Any]:
        self._delete_message(self._channel_message(ctx))
        return 204, None

    # Guilds -------------------------------------------------------------------------------------

    def _guild(self, ctx: _Ctx) -> FakeGuild:
        guild = self._guild_by_id(ctx.int_param("guild_id"))
        if guild is None:
            raise _ApiError(404, 10004, "Unknown Guild")
        return guild

    async def _h_get_guild(self, ctx: _Ctx) -> tuple[int, Any]:
        guild = self._guild(ctx)
        payload = guild.to_payload(full=False)
        if ctx.request.query.get("with_counts", "").lower() in ("1", "true"):
            payload["approximate_member_count"] = len(guild.members)
            payload["approximate_presence_count"] = 0
        return 200, payload

    async def _h_guild_channels(self, ctx: _Ctx) -> tuple[int, Any]:
        return 200, [c.to_payload() for c in self._guild(ctx).channels]

    async def _h_guild_roles(self, ctx: _Ctx) -> tuple[int, Any]:
        return 200, [r.to_payload() for r in self._guild(ctx).roles]

    async def _h_guild_members(self, ctx: _Ctx) -> tuple[int, Any]:
        guild = self._guild(ctx)
        limit = int(ctx.request.query.get("limit", "1"))
        after = int(ctx.request.query.get("after", "0"))
        members = sorted((m for m in guild.members if m.user.id > after), key=lambda m: m.user.id)
        return 200, [m.to_payload() for m in members[:limit]]

    async def _h_guild_member(self, ctx: _Ctx) -> tuple[int, Any]:
        member = self._guild(ctx).member(ctx.int_param("user_id"))
        if member is None:
            raise _ApiError(404, 10007, "Unknown Member")
        return 200, member.to_payload()


def _bot_token(header: str | None) -> str | None:
    if not header:
        return None
    return header.removeprefix("Bot ")


def _image_size(data: bytes) -> tuple[int, int] | None:
    """Width and height of an image, if Pillow can read it (Discord reports both)."""
    try:
        from PIL import Image
    except ImportError:  # Pillow is a project dependency, but the fake should not require it.
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Exception:
        return None
