"""Discord interaction latency: N simultaneous ``/imagine`` through the fake gateway.

Measures, per interaction, the time from the fake sending INTERACTION_CREATE on the gateway to
the bot's initial callback (the deferral, Discord's 3 s deadline) arriving back at the fake, and
the time until the job is accepted (the "Waiting to start…" edit, after the database work and
the broker send). Everything is real except Discord: the discord.py client, the database
(embedded SQLite by default, or PostgreSQL), Redis as the broker. No worker consumes the
benchmark's private queue, which is deleted afterwards.

    python -m bench.bench_interactions                  # 200 interactions, SQLite
    python -m bench.bench_interactions --db postgres    # PostgreSQL at TEST_POSTGRES_URL
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bot.dispatch import CeleryDispatcher
from tests.botutil import bot_harness
from tests.fakes import FakeDiscord
from workers.schema import Engine

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def _create_pg_database() -> tuple[str, str]:
    import psycopg

    admin = POSTGRES_URL.replace("postgresql+psycopg://", "postgresql://")
    name = f"mirage_bench_{secrets.token_hex(4)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}", name


def _drop_pg_database(name: str) -> None:
    import psycopg

    admin = POSTGRES_URL.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def widen_fake_backlog(backlog: int) -> None:
    """Give the fake server's listening socket a deeper accept queue.

    aiohttp's sites listen with a backlog of 128; a burst of 200 new connections overflows it,
    the kernel drops the extra SYNs and the clients retry after TCP's 1 s retransmission timeout,
    which would show up as a 1 s step in the latency of the last ~25% of interactions. That is
    an artefact of the fake (Discord's edge is not a single 128-deep socket), so the benchmark
    widens it unless ``--fake-backlog 128`` asks for the fake as it ships.
    """
    from aiohttp import web

    original = web.SockSite.__init__

    def init(self: web.SockSite, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("backlog", backlog)
        original(self, *args, **kwargs)  # type: ignore[arg-type]

    web.SockSite.__init__ = init  # type: ignore[method-assign]


async def run(count: int, db: str) -> dict[str, float]:
    """Fire ``count`` /imagine at once from ``count`` different members; return the statistics."""
    queue = f"bench-{secrets.token_hex(4)}"
    dispatcher = CeleryDispatcher.from_urls(REDIS_URL, REDIS_URL, queues={Engine.SDXL: queue})
    fake = FakeDiscord(token="fake-bot-token", connect_timeout=30)
    users = [fake.add_member(fake.guild, f"member{i}") for i in range(count)]
    await fake.start()
    fake.install()
    pg_name = None
    with tempfile.TemporaryDirectory() as tmp:
        if db == "postgres":
            url, pg_name = _create_pg_database()
        else:
            url = f"sqlite+aiosqlite:///{tmp}/bench.db"
        try:
            async with bot_harness(
                Path(tmp), url, dispatcher, fake=fake, broker_url=REDIS_URL, result_backend=REDIS_URL
            ) as h:
                started = time.monotonic()
                interactions = await asyncio.gather(
                    *(h.imagine(f"benchmark prompt {i} --seed {i}", user=u) for i, u in enumerate(users))
                )
                callbacks = await asyncio.gather(*(i.callback(timeout=60) for i in interactions))
                waiting = await asyncio.gather(
                    *(
                        i.wait_original(lambda m: "Waiting to start" in (m.get("content") or ""), timeout=120)
                        for i in interactions
                    )
                )
                finished = time.monotonic()
                accepted_at = []
                for inter in interactions:
                    edits = [r for r in inter.requests if r.route == "webhook_message_edit"]
                    edit = next(r for r in edits if "Waiting" in ((r.json or {}).get("content") or ""))
                    accepted_at.append(edit.at - inter.created_at)
                defer = [cb.at - i.created_at for cb, i in zip(callbacks, interactions, strict=True)]
                late = sum(1 for cb in callbacks if cb.status != 200)
                assert len(waiting) == count
                await asyncio.sleep(0.2)
        finally:
            await fake.stop()
            await dispatcher.close()
            if pg_name:
                _drop_pg_database(pg_name)
    import redis

    redis.Redis.from_url(REDIS_URL).delete(queue)
    return {
        "count": count,
        "defer_p50_ms": percentile(defer, 50) * 1000,
        "defer_p99_ms": percentile(defer, 99) * 1000,
        "defer_max_ms": max(defer) * 1000,
        "defer_mean_ms": statistics.mean(defer) * 1000,
        "accepted_p50_ms": percentile(accepted_at, 50) * 1000,
        "accepted_p99_ms": percentile(accepted_at, 99) * 1000,
        "late_callbacks": late,
        "wall_s": finished - started,
    }


def main() -> None:
    """Parse arguments, run, print."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--fake-backlog", type=int, default=1024, help="listen backlog of the fake server")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.fake_backlog != 128:
        widen_fake_backlog(args.fake_backlog)
    stats = asyncio.run(run(args.count, args.db))
    print(
        f"machine: {platform.machine()} {os.cpu_count()} CPU, Python {platform.python_version()}, "
        f"db={args.db}, fake backlog {args.fake_backlog}"
    )
    print(
        f"{stats['count']} simultaneous /imagine: defer p50 {stats['defer_p50_ms']:.0f} ms, "
        f"p99 {stats['defer_p99_ms']:.0f} ms, max {stats['defer_max_ms']:.0f} ms; "
        f"late (past 3 s) {stats['late_callbacks']}"
    )
    print(
        f"job accepted (Waiting… edit): p50 {stats['accepted_p50_ms']:.0f} ms, "
        f"p99 {stats['accepted_p99_ms']:.0f} ms; all {stats['count']} in {stats['wall_s']:.1f} s"
    )


if __name__ == "__main__":
    main()
