"""What the bot does with a result the worker's image classifier flagged: post, spoiler or block.

The worker only classifies (``JobResult.safety``, one verdict per image); the channel decides,
because only the bot knows where a result is going. With ``SAFETY_ALLOW_NSFW_CHANNELS`` on, a
flagged image is posted as it is in an age-restricted (NSFW) channel; elsewhere
``SAFETY_ACTION`` says what happens:

- ``block``: nothing is posted, the job fails with ``ErrorCode.BLOCKED`` and is refunded
  (``bot.failure_messages.BLOCKED_MESSAGE`` tells the member why);
- ``spoiler``: every file of the result is sent as ``SPOILER_<name>``, which Discord blurs until
  clicked.

For an upscale of one tile (U1..U4), pass that tile's verdict alone (:func:`tile_verdicts`): a
safe tile of a flagged grid is posted normally.

A job keeps what the decision needs in its ``params``: whether its channel was age-restricted
when the job was accepted (:data:`CHANNEL_NSFW_KEY`) and the verdicts of its result
(:data:`SAFETY_KEY`), so a U# crop, cut later from the stored grid, is judged by its tile.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal, Protocol

from workers.schema import SafetyVerdict

SPOILER_PREFIX = "SPOILER_"
SAFETY_KEY = "safety"  # job params: the result's verdicts, one per image
CHANNEL_NSFW_KEY = "channel_nsfw"  # job params: the channel was age-restricted at accept time


class SafetyAction(StrEnum):
    """What to do with a result."""

    ALLOW = "allow"
    SPOILER = "spoiler"
    BLOCK = "block"


class SafetySettings(Protocol):
    """The two settings a policy is read from (``BotSettings`` has both)."""

    safety_action: Literal["block", "spoiler"]
    safety_allow_nsfw_channels: bool


@dataclass(frozen=True, slots=True)
class SafetyPolicy:
    """The owner's choice for flagged results."""

    action: Literal["block", "spoiler"] = "block"
    allow_nsfw_channels: bool = True

    @classmethod
    def from_settings(cls, settings: SafetySettings) -> SafetyPolicy:
        """The policy from ``SAFETY_ACTION`` and ``SAFETY_ALLOW_NSFW_CHANNELS``."""
        return cls(action=settings.safety_action, allow_nsfw_channels=settings.safety_allow_nsfw_channels)


def safety_action(
    verdicts: Sequence[SafetyVerdict], channel_is_nsfw: bool, policy: SafetyPolicy
) -> SafetyAction:
    """What to do with a result whose images got ``verdicts``.

    Nothing flagged (or no classifier ran: no verdicts) is always posted. A flagged result is
    posted in an NSFW channel when the policy allows it, else spoilered or blocked.
    """
    if not any(verdict.unsafe for verdict in verdicts):
        return SafetyAction.ALLOW
    if channel_is_nsfw and policy.allow_nsfw_channels:
        return SafetyAction.ALLOW
    return SafetyAction(policy.action)


def tile_verdicts(verdicts: Sequence[SafetyVerdict], index: int) -> list[SafetyVerdict]:
    """The verdict of grid tile ``index`` (1-based, as U1..U4) alone.

    When the verdicts do not line up with the tiles, all of them count: a crop of a flagged grid
    is never posted unflagged by mistake.
    """
    if 1 <= index <= len(verdicts):
        return [verdicts[index - 1]]
    return list(verdicts)


def spoiler_filename(name: str) -> str:
    """``name`` as Discord's spoiler attachment name (``SPOILER_grid.png``); already-prefixed stays."""
    return name if name.startswith(SPOILER_PREFIX) else SPOILER_PREFIX + name


def flagged_labels(verdicts: Sequence[SafetyVerdict]) -> list[str]:
    """The distinct top labels of the flagged images, for the log line of a block or spoiler."""
    return list(dict.fromkeys(verdict.label for verdict in verdicts if verdict.unsafe))


def channel_is_nsfw(channel: object) -> bool:
    """Whether a Discord channel is age-restricted; a thread follows its parent, a DM never is."""
    is_nsfw = getattr(channel, "is_nsfw", None)
    if callable(is_nsfw):
        return bool(is_nsfw())
    return bool(getattr(channel, "nsfw", False))


def job_channel_nsfw(params: Mapping[str, Any] | None) -> bool:
    """Whether a job was accepted in an age-restricted channel (from its stored params)."""
    return bool((params or {}).get(CHANNEL_NSFW_KEY, False))


def job_verdicts(params: Mapping[str, Any] | None) -> list[SafetyVerdict]:
    """The verdicts stored with a job's result; unreadable entries count as flagged.

    An entry that cannot be read is treated as unsafe: a damaged row must not turn a flagged
    image into a clean one.
    """
    raw = (params or {}).get(SAFETY_KEY) or []
    verdicts = []
    for entry in raw if isinstance(raw, list) else [raw]:
        try:
            verdicts.append(SafetyVerdict.model_validate(entry))
        except ValueError:
            verdicts.append(SafetyVerdict(label="unreadable", score=1.0, unsafe=True))
    return verdicts


def verdict_payload(verdicts: Sequence[SafetyVerdict]) -> list[dict[str, Any]]:
    """Verdicts as the JSON stored under :data:`SAFETY_KEY`."""
    return [verdict.model_dump(mode="json") for verdict in verdicts]


def job_safety_action(params: Mapping[str, Any] | None, policy: SafetyPolicy) -> SafetyAction:
    """What to do with a job's stored result in the channel it was accepted in."""
    return safety_action(job_verdicts(params), job_channel_nsfw(params), policy)
