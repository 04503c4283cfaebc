"""``python -m bot`` / ``mirage-bot``: migrate, then serve Discord and the web gallery until stopped.

``python -m bot invite-url`` prints the link that adds the bot to a server (``bot.invite``). A
bad token or an unreachable Discord ends the process with a non-zero status, so the service
manager restarts it (or the operator sees why at once).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable

import aiohttp
import discord
from pydantic import ValidationError

from bot.client import MirageBot
from bot.database import make_engine, make_sessionmaker, upgrade
from bot.dispatch import CeleryDispatcher
from bot.invite import BadToken, client_id_from_token, invite_url
from bot.logconfig import setup_logging
from bot.region import region_job_callback
from bot.settings import BotSettings, describe_invalid, get_settings
from bot.storage import make_store
from workers.schema import QUEUE_API, QUEUE_GPU

log = logging.getLogger("bot")


class ClientStopped(RuntimeError):
    """The Discord client stopped on its own (bad token, Discord unreachable); ``main`` exits 1."""


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
        # The editor's submit (Vary (Region)) accepts its job through this bot, in this process.
        app = create_app(sessions, store, settings, region_job=region_job_callback(bot))
        runner = await start_web(app, settings.web_host, settings.web_port)
        log.info(
            "gallery on http://%s:%s (public URL %s)",
            settings.web_host,
            settings.web_port,
            settings.public_url,
        )

    metrics_runner = None
    try:
        from bot.metrics import start_metrics
    except ImportError:  # prometheus_client is optional, like the gallery
        log.info("metrics not available")
    else:
        metrics_runner = await start_metrics(settings)

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):  # not on Windows
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)

    bot_task = asyncio.create_task(bot.start(token), name="discord")
    stop_task = asyncio.create_task(stop.wait(), name="stop")
    failure: BaseException | None = None
    try:
        done, _pending = await asyncio.wait({bot_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        if bot_task in done and bot_task.exception() is not None:
            failure = bot_task.exception()
            log.error("the Discord client stopped: %s", _failure_text(failure))
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
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        await dispatcher.close()
        await engine.dispose()
        log.info("stopped")
    if failure is not None:
        raise ClientStopped(_failure_text(failure)) from failure


def _failure_text(exc: BaseException) -> str:
    """Why the Discord client stopped, in words an operator can act on."""
    if isinstance(exc, discord.LoginFailure):
        return "Discord refused the token (DISCORD_TOKEN is wrong or was reset)"
    if isinstance(exc, OSError | aiohttp.ClientError):
        return f"Discord could not be reached ({exc.__class__.__name__}: {exc})"
    return f"{exc.__class__.__name__}: {exc}"


def _start_local_worker() -> subprocess.Popen[bytes]:
    """A worker for both queues beside the bot, for one-machine setups on the embedded defaults."""
    queues = f"{QUEUE_GPU},{QUEUE_API}"
    command = [sys.executable, "-m", "workers", "worker", "--queues", queues, "--concurrency", "1"]
    log.info("starting a local worker: %s", " ".join(command[1:]))
    # Its own process group, so a Ctrl-C aimed at the bot reaches the worker only through us.
    return subprocess.Popen(command, start_new_session=True, preexec_fn=_dies_with_parent())


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _dies_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has Linux send the child SIGTERM (a warm shutdown) when the bot dies.

    ``main`` stops the worker on its way out, but a bot killed outright (OOM killer, SIGKILL, a
    SIGTERM or SIGHUP before ``run`` handles them) never gets there, and the worker, in its own
    session, would live on and hold the GPU beside the next bot's worker. None off Linux.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up now: the child only calls it
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGTERM))
        if os.getppid() != parent:  # the bot died before prctl took effect: no signal will come
            os._exit(1)

    return preexec


def _stop_local_worker(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is not None:
        return
    worker.terminate()  # Celery's warm shutdown: finishes or requeues (acks late) the current task
    try:
        worker.wait(timeout=30)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def print_invite_url(settings: BotSettings, client_id: int | None) -> None:
    """Print the invite link of the application ``client_id`` or of ``DISCORD_TOKEN``'s."""
    if client_id is None:
        token = settings.discord_token.get_secret_value()
        if not token:
            raise SystemExit(
                "Give --client-id (Discord developer portal → your application → General Information → "
                "Application ID) or set DISCORD_TOKEN."
            )
        try:
            client_id = client_id_from_token(token)
        except BadToken as exc:
            raise SystemExit(
                f"DISCORD_TOKEN does not look like a bot token ({exc}); give --client-id."
            ) from exc
    print(invite_url(client_id))


def main(argv: list[str] | None = None) -> None:
    """Entry point: settings, logging, then the event loop (with a local worker on request)."""
    parser = argparse.ArgumentParser(prog="python -m bot", description="Run the Mirage Discord bot.")
    parser.add_argument(
        "--with-worker",
        action="store_true",
        help="also run a Celery worker for the gpu and api queues in a child process (one-machine setup)",
    )
    parser.add_argument(
        "command",
        nargs="?",
        choices=("run", "invite-url"),
        default="run",
        help="run (the default): serve Discord and the gallery; invite-url: print the link that adds "
        "the bot to a server",
    )
    parser.add_argument(
        "--client-id",
        type=int,
        help="invite-url: the application id (default: read from DISCORD_TOKEN)",
    )
    args = parser.parse_args(argv)
    try:
        settings = get_settings()
    except ValidationError as exc:
        # A wrong value is the operator's to fix: name the variable and what it takes, no traceback.
        raise SystemExit(describe_invalid(exc)) from None
    if args.command == "invite-url":
        print_invite_url(settings, args.client_id)
        return
    setup_logging(settings)
    if not settings.discord_token.get_secret_value():
        raise SystemExit(
            "DISCORD_TOKEN is not set: put DISCORD_TOKEN=<your bot token> in .env or the environment "
            "(Discord developer portal → your application → Bot → Reset Token)."
        )
    worker = _start_local_worker() if args.with_worker else None
    try:
        asyncio.run(run(settings))
    except ClientStopped as exc:
        # A non-zero exit lets the service manager (systemd Restart=on-failure, Compose) restart it.
        raise SystemExit(f"Mirage stopped: {exc}") from None
    finally:
        if worker is not None:
            _stop_local_worker(worker)


if __name__ == "__main__":
    main()
