"""The supervisor: notice a running job whose worker died, and put it back in line within seconds.

The broker's own redelivery is slow or absent: Redis and the embedded transport hand an
unacknowledged message to another worker only after the visibility timeout (30 minutes by
default), and a result store that lost its data forgets a job entirely. So the bot watches the
workers' heartbeats instead of trusting the broker: a worker writes ``Progress.heartbeat_at``
into the task's PROGRESS state every ``HEARTBEAT_INTERVAL_S`` (10 s) while it runs a job. A
running job whose heartbeat has not changed for ``heartbeat_stale_s`` (45 s) is presumed dead:
the job goes back to *waiting* (``Lifecycle.requeue``, conditional, so one bot process wins when
several notice), its stale result is dropped, and the normal release sends it again under the
same job id, ahead of the member's newer jobs. A job is re-sent at most ``max_resends`` times,
then fails and is refunded.

Staleness is measured on the bot's own clock, from when the bot first saw the current heartbeat
value, never by comparing the worker's timestamp with the bot's: clocks on two machines need not
agree. A job whose state reads *pending* although it was running (a result store that restarted
without its data) is judged the same way. A running state without any heartbeat (a worker of an
older version, or one still loading its model) is left to the run timeout.

If the presumed-dead worker was only slow and finishes after all, its result is delivered or,
when the re-sent copy finished first, ignored: the lifecycle's conditional transitions let only
the first result finish the job, and the job is charged once either way (credits are tied to the
job row, not to runs).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from bot.dispatch import PENDING, RUNNING_STATES, Dispatcher, TaskState
from bot.lifecycle import Lifecycle
from bot.models import Job, JobStatus
from bot.settings import BotSettings

log = logging.getLogger(__name__)

HEARTBEAT_KEY = "heartbeat_at"
WORKER_KEY = "worker"
LOST = "lost"  # the token for a running job whose state the store no longer knows
GAVE_UP = "The workers running this job kept stopping, so it was cancelled."


class Action(StrEnum):
    """What the tracker must do about a job that is not final yet."""

    RUN_TIMEOUT = "run_timeout"  # running longer than job_timeout_s: revoke, then refund
    WAIT_TIMEOUT = "wait_timeout"  # waited for a worker longer than max_queue_wait_s: same
    RECOVER = "recover"  # its worker is presumed dead: put it back in line


def timeout_message(settings: BotSettings, *, waited: bool) -> str:
    """The member-facing reason for a job refunded after waiting or running too long."""
    if waited:
        limit = settings.max_queue_wait_s
        minutes = f"{max(1, round(limit / 60))} minutes"
        shown = f"{round(limit / 3600, 1):g} hours" if limit >= 3600 else minutes
        return f"No worker was free to start this job within {shown}."
    return f"The job took longer than {max(1, round(settings.job_timeout_s / 60))} minutes."


class Verdict(StrEnum):
    """What the supervisor makes of one running job."""

    ALIVE = "alive"  # its heartbeat moved within the window
    STALE = "stale"  # no new heartbeat for heartbeat_stale_s: its worker is presumed dead
    UNSUPERVISED = "unsupervised"  # no heartbeat to judge by: the run timeout decides


def heartbeat_token(state: TaskState) -> Any | None:
    """The value that must keep changing while the job's worker lives, or None if there is none."""
    if state.state == PENDING:
        return LOST
    if state.state not in RUNNING_STATES or not isinstance(state.info, dict):
        return None
    beat = state.info.get(HEARTBEAT_KEY)
    if beat is None:
        return None
    return (state.info.get(WORKER_KEY), str(beat))


@dataclass(slots=True)
class _Seen:
    token: Any
    since: float  # the bot's monotonic clock when this token was first seen


class Supervisor:
    """Judges running jobs by their heartbeats and puts dead workers' jobs back in line."""

    def __init__(
        self,
        settings: BotSettings,
        lifecycle: Lifecycle,
        dispatcher: Dispatcher,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.lifecycle = lifecycle
        self.dispatcher = dispatcher
        self.clock = clock
        self._seen: dict[str, _Seen] = {}
        self.requeued = 0  # jobs this process put back in line (for tests and logs)

    def observe(self, job: Job, state: TaskState) -> Verdict:
        """Record what the store says about a running job and judge whether its worker lives."""
        token = heartbeat_token(state)
        if token is None:
            self._seen.pop(job.id, None)
            return Verdict.UNSUPERVISED
        now = self.clock()
        seen = self._seen.get(job.id)
        if seen is None or seen.token != token:
            self._seen[job.id] = _Seen(token, now)
            return Verdict.ALIVE
        return Verdict.STALE if now - seen.since > self.settings.heartbeat_stale_s else Verdict.ALIVE

    def judge(self, job: Job, state: TaskState, now: datetime) -> Action | None:
        """What to do about a non-final job, timing waiting and running apart.

        A queued job waits up to ``max_queue_wait_s`` for a worker; a running one gets
        ``job_timeout_s`` from its start; a running one whose heartbeat went stale is recovered.
        """
        if job.status == JobStatus.RUNNING.value:
            started_at = job.started_at or job.queued_at or job.created_at
            if started_at is not None and now - started_at > timedelta(seconds=self.settings.job_timeout_s):
                return Action.RUN_TIMEOUT
            return Action.RECOVER if self.observe(job, state) is Verdict.STALE else None
        if state.state in RUNNING_STATES:
            return None  # it just started; the tracker records it as running
        since = job.queued_at or job.created_at
        if since is not None and now - since > timedelta(seconds=self.settings.max_queue_wait_s):
            return Action.WAIT_TIMEOUT
        return None

    def prune(self, running_ids: Iterable[str]) -> None:
        """Forget jobs that are no longer running (finished, requeued, or taken by another process)."""
        keep = set(running_ids)
        for job_id in [job_id for job_id in self._seen if job_id not in keep]:
            del self._seen[job_id]

    async def recover(self, job: Job) -> bool:
        """Put a stale job back in line, or fail it once it has been re-sent too often.

        Returns True when this process requeued it. Failing goes through ``fail``, the tracker's
        own failure path (revoke first, then refund and tell the member).
        """
        self._seen.pop(job.id, None)
        if job.status != JobStatus.RUNNING.value:
            return False
        if job.resends >= self.settings.max_resends:
            log.warning("job %s: its worker stopped %d times; giving up", job.id, job.resends + 1)
            return False
        if not await self.lifecycle.requeue(job.id, job.resends):
            return False  # another process requeued or finished it first
        self.requeued += 1
        log.warning(
            "job %s: no heartbeat for %.0fs, its worker is presumed dead; sending it again (re-send %d)",
            job.id,
            self.settings.heartbeat_stale_s,
            job.resends + 1,
        )
        # The dead run's stale PROGRESS must not be read as the new run's: drop it, so the job
        # reads as pending until a worker starts it again.
        await self.dispatcher.forget(job.id, done=False)
        return True

    def exhausted(self, job: Job) -> bool:
        """Whether a stale job has used up its re-sends and must fail instead."""
        return job.resends >= self.settings.max_resends
