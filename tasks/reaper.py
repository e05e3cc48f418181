"""Finding jobs nobody is running any more, and ending them.

Every running job beats a Redis key (:mod:`tasks.monitor`). A job still ``running`` or
``cancelling`` whose key has expired lost its process in a way no hook saw (the whole worker
SIGKILLed, the host gone). The reaper ends it: ``cancelled`` if a cancel was requested (with that
reason), else ``failed`` with the cause. Run by every worker's main process on a timer, and by
``andon reap``; a job is finalized once whoever gets there first.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from db.models import Job
from db.session import session_scope
from db.settings import get_settings
from db.vocabulary import CancellationReason, CancellationSource, JobStatus
from tasks.cancellation.keys import heartbeat_key
from tasks.control import finalize_stopped
from tasks.process import get_redis


def reap_lost_jobs(actor: str = "reaper") -> list[str]:
    """Finalize running jobs whose heartbeat expired; return their ids."""
    settings = get_settings()
    # a job gets its first beat before it is marked running, so any running job older than a few
    # beats without a key is lost
    cutoff = datetime.now(UTC) - timedelta(seconds=settings.heartbeat_s * 3)
    with session_scope() as session:
        candidates = list(session.scalars(
            select(Job.id).where(Job.status.in_([JobStatus.RUNNING.value, JobStatus.CANCELLING.value]),
                                 Job.started_at < cutoff)
        ))
    if not candidates:
        return []
    beats = get_redis().mget([heartbeat_key(j) for j in candidates])
    reaped = []
    for job_id, beat in zip(candidates, beats):
        if beat is None and finalize_stopped(
            job_id, CancellationReason.USER_REQUESTED, CancellationSource.WORKER_LOST,
            fail_with="worker lost: heartbeat expired", actor=actor,
        ):
            reaped.append(job_id)
    return reaped
