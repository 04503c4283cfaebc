"""Mirage's Discord bot: commands, buttons, credits, job records, galleries and delivery."""
