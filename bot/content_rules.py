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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal, Protocol

from workers.schema import SafetyVerdict

SPOILER_PREFIX = "SPOILER_"


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
