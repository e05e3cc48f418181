"""Finding jobs nobody is running any more, and giving them back to the queue.

Every running job beats a Redis key (:mod:`tasks.monitor`). A job still ``running`` or
``cancelling`` whose beat has stopped lost its process in a way no hook saw (the whole worker
SIGKILLed, the host gone). The reaper gives it back: ``cancelled`` if a cancel was requested (with
that reason), else requeued with a new message to run the items not done (failed the second time:
:func:`tasks.control.recover_lost_run`).

A Redis outage is not evidence that a worker died: while Redis is away (or paused: a reply that
takes longer than a beat) every key looks expired. So a job is reaped only when its beat was missing
in two looks at least ``confirm_s`` apart, with Redis answering promptly the whole time in between —
a live owner beats again within one interval once Redis is back. Run by every worker's main process
on a timer (:class:`Reaper` keeps the looks), and by ``andon reap`` (two looks, ``confirm_s`` apart).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from redis.exceptions import RedisError
from sqlalchemy import select

from db.models import Job
from db.session import session_scope
from db.settings import get_settings
from db.vocabulary import JobStatus
from tasks.cancellation.keys import heartbeat_key
from tasks.control import recover_lost_run
from tasks.process import get_redis

__all__ = ["Reaper", "reap_lost_jobs"]


class Reaper:
    """The reaper's memory between passes: when each job's beat was first seen missing, and since
    when Redis has answered promptly."""

    def __init__(self, heartbeat_s: float, confirm_s: float | None = None) -> None:
        self.heartbeat_s = heartbeat_s
        self.confirm_s = confirm_s if confirm_s is not None else heartbeat_s * 3
        self.missing_since: dict[str, float] = {}
        self.redis_ok_since: float | None = None

    def look(self) -> list[str]:
        """One look: the running jobs whose beat has been missing long enough, Redis up throughout."""
        cutoff = datetime.now(UTC) - timedelta(seconds=self.heartbeat_s * 3)
        with session_scope() as session:
            running = list(session.scalars(select(Job.id).where(
                Job.status.in_([JobStatus.RUNNING.value, JobStatus.CANCELLING.value]), Job.started_at < cutoff)))
        if not running:
            self.missing_since.clear()
            return []
        asked = time.monotonic()
        try:
            beats = get_redis().mget([heartbeat_key(j) for j in running])
        except RedisError:
            self.redis_ok_since = None
            self.missing_since.clear()
            return []
        now = time.monotonic()
        if now - asked > self.heartbeat_s:  # Redis stalled (paused?): what it says now proves nothing yet
            self.redis_ok_since = now
            self.missing_since.clear()
            return []
        if self.redis_ok_since is None:
            self.redis_ok_since = asked
        missing = {job_id for job_id, beat in zip(running, beats) if beat is None}
        self.missing_since = {j: self.missing_since.get(j, now) for j in missing}
        return [j for j, since in self.missing_since.items()
                if now - since >= self.confirm_s and since - self.redis_ok_since >= 0
                and now - self.redis_ok_since >= self.confirm_s]

    def reap(self, actor: str = "reaper") -> list[str]:
        """Give back every job :meth:`look` confirms lost; returns their ids."""
        reaped = []
        for job_id in self.look():
            if recover_lost_run(job_id, actor, resend=True) != "ended":
                reaped.append(job_id)
            self.missing_since.pop(job_id, None)
        return reaped


def reap_lost_jobs(actor: str = "reaper") -> list[str]:
    """One-shot (``andon reap``): two looks ``confirm_s`` apart, then give back the confirmed."""
    settings = get_settings()
    reaper = Reaper(settings.heartbeat_s)
    reaper.look()
    time.sleep(reaper.confirm_s)
    return reaper.reap(actor)
