"""A member's ``/prefer`` settings applied to a prompt before it is parsed.

- ``/prefer option set mine --ar 3:2 --stylize 250``: ``--mine`` in a prompt expands to those
  parameters (Midjourney's custom options). Expansion happens once, before parsing, so an option
  can never expand into another option.
- ``/prefer suffix --ar 16:9 --style raw``: appended to every prompt. A parameter the prompt sets
  itself wins, so ``--ar 1:1`` in a prompt overrides a suffix's ``--ar``.

Both are validated when they are set (:func:`check_parameters`), so a saved value always parses.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from bot import global_defaults
from bot.access import account_guild
from bot.models import Member, MemberOption
from bot.operations import Actor
from bot.prompt import KNOWN_PARAMETERS, PARAMETER_MARKER, PromptError, canonical_parameter, plan_prompts
from bot.settings import BotSettings
from bot.styles import StylePreset

OPTION_NAME_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
MAX_OPTIONS = 25
MAX_VALUE_LENGTH = 500
# A parameter in a prompt: the parser's marker (phones turn "--" into a dash) then a name.
_PARAM_RE = re.compile(rf"(?:^|(?<=\s))(?:{PARAMETER_MARKER})(?P<name>[A-Za-z][A-Za-z0-9_-]*)")
_BUILT_IN = frozenset(name.removeprefix("--") for name in KNOWN_PARAMETERS)
# Parameters the parser refuses together, as one setting: the prompt's own overrides the suffix's
# ("--relax" with a suffix's "--fast" would fail every such prompt on a parameter the member did not
# type there). Aliases ("--aspect" for "--ar") are the parser's own (canonical_parameter).
_SAME_SETTING = {
    "niji": "version",
    "relax": "fast",
    "turbo": "fast",
    "public": "stealth",
    "raw": "style",
}


@dataclass(frozen=True)
class Prefs:
    """One member's prompt preferences."""

    suffix: str = ""
    options: Mapping[str, str] = field(default_factory=dict)
    remix: bool = False


def _canonical(name: str) -> str:
    parameter = canonical_parameter(name)
    return _SAME_SETTING.get(parameter, parameter)


def check_option_name(name: str) -> str | None:
    """Why ``name`` cannot be a custom option, or None. Names are stored lowercased."""
    lowered = name.lower().removeprefix("--")
    if not OPTION_NAME_RE.fullmatch(lowered):
        return (
            f"`{name[:40]}` is not a valid option name: use 1-32 lowercase letters, digits, "
            "`-` or `_`, starting with a letter."
        )
    if lowered in _BUILT_IN:
        return f"`--{lowered}` is a built-in parameter; pick another name for your option."
    return None


def check_parameters(value: str, styles: Mapping[str, StylePreset] | None = None) -> str | None:
    """Why ``value`` cannot be a suffix or an option's value, or None.

    It must be parameters only (no prompt text) and parse, permutation braces included, so a saved
    value never breaks a prompt.
    """
    value = value.strip()
    if not value:
        return "The value is empty: give parameters such as `--ar 3:2 --stylize 250`."
    if len(value) > MAX_VALUE_LENGTH:
        return f"The value is {len(value)} characters long; the limit is {MAX_VALUE_LENGTH}."
    if not _PARAM_RE.match(value):
        return "The value must be parameters only, starting with `--`, e.g. `--ar 3:2 --stylize 250`."
    try:
        # plan_prompts, not analyse_prompt: a "{" never closed passes the one-prompt parser, and
        # then every prompt it is added to fails on the brace.
        plan_prompts(f"test {value}", styles=styles)
    except PromptError as exc:
        return str(exc)
    return None


def expand_options(text: str, options: Mapping[str, str]) -> str:
    """``text`` with each ``--name`` of a custom option replaced by its parameters (once)."""
    if not options:
        return text

    def replace(match: re.Match[str]) -> str:
        value = options.get(match["name"].lower())
        return value if value is not None else match.group(0)

    return _PARAM_RE.sub(replace, text)


def _chunks(text: str) -> list[tuple[str, str]]:
    """``(canonical name, "--name value")`` for every parameter in ``text``."""
    matches = list(_PARAM_RE.finditer(text))
    out = []
    for index, match in enumerate(matches):
        end = matches[index + 1].start() if index + 1 < len(matches) else len(text)
        out.append((_canonical(match["name"]), text[match.start() : end].strip()))
    return out


def append_suffix(text: str, suffix: str) -> str:
    """``text`` with the suffix's parameters that the prompt does not set itself."""
    if not suffix.strip():
        return text
    present = {name for name, _chunk in _chunks(text)}
    extra = [chunk for name, chunk in _chunks(suffix) if name not in present]
    return " ".join([text.strip(), *extra]) if extra else text


def apply_prefs(text: str, prefs: Prefs) -> str:
    """The prompt as parsed: options expanded, then the suffix appended."""
    return append_suffix(expand_options(text, prefs.options), prefs.suffix)


async def load_prefs(session: AsyncSession, guild_id: int, user_id: int) -> tuple[Member | None, Prefs]:
    """The member row (None before their first job or preference) and their preferences."""
    query = select(Member).where(Member.guild_id == guild_id, Member.user_id == user_id)
    member = await session.scalar(query)
    if member is None:
        return None, Prefs()
    rows = await session.scalars(select(MemberOption).where(MemberOption.member_id == member.id))
    return member, Prefs(
        suffix=member.prompt_suffix or "",
        options={row.name: row.value for row in rows},
        remix=bool(member.remix),
    )


async def prompting_context(
    session: AsyncSession, actor: Actor, settings: BotSettings
) -> tuple[Member | None, Prefs, BotSettings]:
    """The paying member, their prompt preferences, and ``settings`` with the owners' global defaults."""
    guild_id = await account_guild(session, actor)  # a DM: the paying account
    member, prefs = await load_prefs(session, guild_id, actor.user_id)
    effective, _defaults = await global_defaults.current(session, settings)
    return member, prefs, effective
