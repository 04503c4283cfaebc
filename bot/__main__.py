"""``python -m bot`` / ``mirage-bot``: migrate, then serve Discord and the web gallery until stopped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from bot.client import MirageBot
from bot.database import make_engine, make_sessionmaker, upgrade
from bot.dispatch import CeleryDispatcher
from bot.logconfig import setup_logging
from bot.settings import BotSettings, get_settings
from bot.storage import make_store

log = logging.getLogger("bot")


async def run(settings: BotSettings, *, stop: asyncio.Event | None = None) -> None:
    """Run the bot (and the gallery) until SIGTERM/SIGINT, ``stop`` is set, or the gateway fails."""
    token = settings.discord_token.get_secret_value()
    if not token:
        raise SystemExit("DISCORD_TOKEN is not set")

    log.info("migrating the database")
    await asyncio.to_thread(upgrade, settings.database_url)
    engine = make_engine(settings.database_url)
    sessions = make_sessionmaker(engine)
    store = make_store(settings)
    dispatcher = CeleryDispatcher.from_urls(settings.broker_url, settings.result_backend)
    bot = MirageBot(settings=settings, sessions=sessions, store=store, dispatcher=dispatcher)

    runner = None
    try:
        from bot.web.app import create_app, start_web
    except ImportError:  # the gallery is optional; the bot works without it
        log.info("web gallery not available")
    else:
        runner = await start_web(create_app(sessions, store, settings), settings.web_host, settings.web_port)
        log.info(
            "gallery on http://%s:%s (public URL %s)",
            settings.web_host,
            settings.web_port,
            settings.public_url,
        )

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):  # not on Windows
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)

    bot_task = asyncio.create_task(bot.start(token), name="discord")
    stop_task = asyncio.create_task(stop.wait(), name="stop")
    try:
        done, _pending = await asyncio.wait({bot_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        if bot_task in done and bot_task.exception() is not None:
            log.error("the Discord client stopped: %s", bot_task.exception())
        else:
            log.info("shutting down")
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        stop_task.cancel()
        await bot.close()
        if not bot_task.done():
            bot_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await bot_task
        if runner is not None:
            await runner.cleanup()
        await dispatcher.close()
        await engine.dispose()
        log.info("stopped")


def main() -> None:
    """Entry point: settings, logging, then the event loop."""
    settings = get_settings()
    setup_logging(settings)
    asyncio.run(run(settings))


if __name__ == "__main__":
    main()
