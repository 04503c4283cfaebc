"""Test doubles for external services (a fake Discord for the real discord.py client)."""

from .discord_server import (
    FailureRule,
    FakeChannel,
    FakeDiscord,
    FakeGuild,
    FakeInteraction,
    FakeMember,
    FakeRole,
    FakeUser,
    RecordedFile,
    RecordedRequest,
)

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
