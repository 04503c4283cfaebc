"""The bot's features, one cog per file, loaded as extensions in ``MirageBot.setup_hook``."""
