"""The client: application commands are synced only when they changed, to each configured guild."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.botutil import (
    FakeDispatcher,
    Harness,
    bot_harness,
)

pytestmark = pytest.mark.timeout(60)


async def test_commands_sync_only_when_changed(h: Harness) -> None:
    puts = [r for r in h.fake.requests if r.method == "PUT" and r.path.endswith("/commands")]
    assert len(puts) == 1
    names = sorted(c["name"] for c in h.fake.commands())
    assert names == [
        "blend",
        "describe",
        "gallery",
        "imagine",
        "info",
        "mirage",
        "prefer",
        "public",
        "quota",
        "settings",
        "status",
        "stealth",
    ]
    await h.restart_bot()
    puts = [r for r in h.fake.requests if r.method == "PUT" and r.path.endswith("/commands")]
    assert len(puts) == 1  # same commands: no second sync


async def test_guild_ids_sync_to_each_guild(tmp_path: Path, sqlite_url: str) -> None:
    async with bot_harness(tmp_path, sqlite_url, FakeDispatcher(), start=False) as h:
        h.settings.discord_guild_ids = [h.fake.guild.id]
        await h.start_bot()
        assert {c["name"] for c in h.fake.commands(h.fake.guild)} >= {"imagine", "quota"}
        assert h.fake.commands() == []


async def test_a_guild_that_refuses_the_sync_does_not_block_the_others(
    tmp_path: Path, sqlite_url: str
) -> None:
    """A stale DISCORD_GUILD_IDS entry (the bot was removed there) costs only that guild."""
    stale = 111_111_111_111_111_111
    async with bot_harness(tmp_path, sqlite_url, FakeDispatcher(), start=False) as h:
        h.settings.discord_guild_ids = [stale, h.fake.guild.id]
        h.fake.fail_next(
            "PUT", rf"/guilds/{stale}/commands$", 403, {"message": "Missing Access", "code": 50001}
        )
        await h.start_bot()
        assert {c["name"] for c in h.fake.commands(h.fake.guild)} >= {"imagine", "quota"}
        puts = [r.path for r in h.fake.requests if r.method == "PUT" and r.path.endswith("/commands")]
        assert any(f"/guilds/{stale}/" in path for path in puts)  # it was tried, and refused
