"""``MirageBot``: the discord.py client, with its dependencies passed in by the caller.

Following discord.py's ``advanced_startup`` example, the database sessions, media store and
dispatcher are constructor arguments (tests build the bot against their own), extensions are
loaded in ``setup_hook``, and every button class is registered with ``add_dynamic_items`` so
presses on old messages work after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import discord
from discord.ext import commands
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.buttons import remix_submitted
from bot.checks import MirageTree
from bot.delivery import Delivery
from bot.dispatch import DEFAULT_QUEUES, Dispatcher
from bot.flow import JobFlow
from bot.jobs import JobService
from bot.lifecycle import Lifecycle
from bot.results import Results
from bot.sending import Sender
from bot.settings import BotSettings
from bot.signing import Signer, signer_from_settings
from bot.storage import MediaStore
from bot.tracker import Tracker
from bot.views import DYNAMIC_ITEMS
from workers.schema import Engine

log = logging.getLogger(__name__)

EXTENSIONS = (
    "bot.cogs.imagine",
    "bot.cogs.describe",
    "bot.cogs.blend",
    "bot.cogs.prefer",
    "bot.cogs.account",
    "bot.cogs.admin",
    "bot.cogs.owner",
)
COMMAND_HASH_FILE = "command_hash.json"


class MirageBot(commands.Bot):
    """The Mirage Discord client: slash commands, buttons, and the job tracker."""

    def __init__(
        self,
        *,
        settings: BotSettings,
        sessions: async_sessionmaker[AsyncSession],
        store: MediaStore,
        dispatcher: Dispatcher,
        poll_interval: float = 0.5,
        state_dir: Path | None = None,
        sync_commands: bool = True,
        **options: Any,
    ) -> None:
        # Mirage never joins voice; without this, every start warns that PyNaCl and davey are
        # missing, which reads like a broken install.
        discord.VoiceClient.warn_nacl = False
        discord.VoiceClient.warn_dave = False
        # Slash commands and components arrive as interactions: no privileged intents needed.
        intents = options.pop("intents", None) or discord.Intents.none()
        intents.guilds = True
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=intents,
            help_command=None,
            tree_cls=MirageTree,
            allowed_mentions=discord.AllowedMentions(everyone=False, roles=False, users=True),
            **options,
        )
        self.settings = settings
        self.sessions = sessions
        self.store = store
        self.dispatcher = dispatcher
        self.state_dir = Path(state_dir) if state_dir is not None else Path(settings.media_dir).parent
        self.sync_commands_on_start = sync_commands
        # The job machinery, lowest layer first: state, stored images, the service that accepts
        # and dispatches, the messages, the loop that follows the broker, and the shared entry.
        self.lifecycle = Lifecycle(sessions)
        self.results = Results(sessions, store)
        self.jobs = JobService(settings, sessions, dispatcher, self.lifecycle, self.results)
        self.delivery = Delivery(settings, sessions, self.lifecycle, self.results, Sender(self))
        self.tracker = Tracker(
            settings,
            sessions,
            dispatcher,
            self.jobs,
            self.lifecycle,
            self.results,
            self.delivery,
            poll_interval=poll_interval,
        )
        self.flow = JobFlow(self.jobs, self.tracker)
        self._metrics_task: asyncio.Task[None] | None = None
        self._signer: Signer | None = None

    async def link_signer(self) -> Signer:
        """The signer of gallery links (Vary (Region), private pages), made on first use.

        The same settings give the gallery the same key, so its links open there.
        """
        if self._signer is None:
            # Reading (or creating) the secret file touches the disk: off the event loop.
            self._signer = await asyncio.to_thread(signer_from_settings, self.settings)
        return self._signer

    def dispatcher_queues(self) -> dict[Engine, str]:
        """Engine → queue name, as the dispatcher routes them."""
        return dict(getattr(self.dispatcher, "queues", DEFAULT_QUEUES))

    async def setup_hook(self) -> None:
        """Load the cogs, register the buttons, sync commands if they changed, start the tracker."""
        for extension in EXTENSIONS:
            await self.load_extension(extension)
        self.add_dynamic_items(*DYNAMIC_ITEMS)
        self.add_listener(remix_submitted, "on_interaction")
        if self.sync_commands_on_start:
            try:
                await self.sync_commands()
            except discord.HTTPException:
                # A failed sync leaves the previously synced commands in place; keep serving.
                log.exception("syncing application commands failed")
        self.tracker.start()
        self._start_metrics_poller()

    def _start_metrics_poller(self) -> None:
        """Keep the workers-online and queue-depth gauges fresh, if metrics are installed."""
        try:
            from bot.metrics import poll_workers
        except ImportError:
            return
        self._metrics_task = asyncio.create_task(poll_workers(self.dispatcher), name="mirage-metrics")

    # --- command sync ----------------------------------------------------------------------------

    def _hash_path(self) -> Path:
        return self.state_dir / COMMAND_HASH_FILE

    def _load_hashes(self) -> dict[str, str]:
        try:
            data = json.loads(self._hash_path().read_text())
            return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _save_hashes(self, hashes: dict[str, str]) -> None:
        path = self._hash_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(hashes, indent=1, sort_keys=True))
            tmp.replace(path)
        except OSError:
            log.warning("could not store the command hash at %s", path, exc_info=True)

    def command_payload(self, guild: discord.abc.Snowflake | None = None) -> list[dict[str, Any]]:
        """The JSON Discord would receive for a sync of ``guild`` (None: global)."""
        commands_ = self.tree.get_commands(guild=guild)
        return [command.to_dict(self.tree) for command in commands_]

    async def sync_commands(self) -> list[str]:
        """Sync app commands where their payload changed since the last sync; returns the scopes.

        With ``DISCORD_GUILD_IDS`` the commands are copied to each guild (guild commands update
        instantly); otherwise they are synced globally. Syncing is rate limited by Discord, so a
        restart with the same commands does not call it at all.
        """
        hashes = self._load_hashes()
        synced: list[str] = []
        guilds: list[discord.abc.Snowflake | None]
        if self.settings.discord_guild_ids:
            guilds = [discord.Object(gid) for gid in self.settings.discord_guild_ids]
            for guild in guilds:
                self.tree.copy_global_to(guild=guild)  # type: ignore[arg-type]
        else:
            guilds = [None]
        for guild in guilds:
            scope = f"{self.application_id}:{guild.id if guild else 'global'}"
            payload = self.command_payload(guild)
            digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
            if hashes.get(scope) == digest:
                log.info("application commands unchanged for %s; not syncing", scope)
                continue
            try:
                await self.tree.sync(guild=guild)
            except discord.HTTPException as exc:
                if guild is None:
                    raise
                # One guild that refuses (a stale DISCORD_GUILD_IDS entry, the bot removed there)
                # must not leave the guilds after it without commands; it is tried again next start.
                log.warning(
                    "could not sync application commands to guild %s (is the bot in it, invited "
                    "with applications.commands?): %s",
                    guild.id,
                    exc,
                )
                continue
            hashes[scope] = digest
            synced.append(scope)
            log.info("synced %d application commands to %s", len(payload), scope)
        if synced:
            self._save_hashes(hashes)
        return synced

    # --- lifecycle -----------------------------------------------------------------------------

    async def on_ready(self) -> None:
        """Log the identity once connected."""
        log.info(
            "connected as %s (id %s) in %d guilds",
            self.user,
            self.user.id if self.user else "?",
            len(self.guilds),
        )

    async def close(self) -> None:
        """Stop the tracker first (it may be mid-delivery), then the gateway and HTTP session."""
        if self._metrics_task is not None:
            self._metrics_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._metrics_task
        await self.tracker.stop()
        await super().close()
