"""``python -m bot.web``: serve the gallery on its own, beside a bot that owns the database.

The bot migrates the database when it starts, so this process does not by default (two processes
migrating at once would race); ``--migrate`` runs ``alembic upgrade head`` first for setups where
the gallery starts on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal

from bot.database import make_engine, make_sessionmaker, upgrade
from bot.settings import BotSettings
from bot.storage import make_store
from bot.web.app import create_app, start_web

log = logging.getLogger("bot.web")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; host and port default to WEB_HOST and WEB_PORT."""
    parser = argparse.ArgumentParser(prog="python -m bot.web", description="Serve the Mirage gallery.")
    parser.add_argument("--host", help="address to listen on (default: WEB_HOST)")
    parser.add_argument("--port", type=int, help="port to listen on (default: WEB_PORT)")
    parser.add_argument("--migrate", action="store_true", help="run database migrations before serving")
    return parser.parse_args(argv)


async def serve(settings: BotSettings, host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM, then close connections and the database pool."""
    engine = make_engine(settings.database_url)
    app = create_app(make_sessionmaker(engine), make_store(settings), settings)
    runner = await start_web(app, host, port)
    log.info("gallery listening on http://%s:%s (public URL %s)", host, port, settings.public_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # Windows has no signal handlers in asyncio
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await engine.dispose()


def main(argv: list[str] | None = None) -> None:
    """Entry point for ``python -m bot.web``."""
    args = parse_args(argv)
    settings = BotSettings()
    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.migrate:
        upgrade(settings.database_url)
    host = args.host or settings.web_host
    port = args.port if args.port is not None else settings.web_port
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(settings, host, port))


if __name__ == "__main__":
    main()
