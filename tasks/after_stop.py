"""After a job's ``cancelled`` row is committed, its policy may resume it (:mod:`tasks.policy`)."""

from __future__ import annotations

import logging

from sqlalchemy import select

from db import jobs as job_rows
from db.models import Job, JobEvent
from db.session import session_scope
from db.vocabulary import CancellationReason, CancellationSource, EventKind, JobStatus
from tasks import resume
from tasks.errors import AndonError
from tasks.policy import FINAL, REQUEUE, RESUMABLE, max_resumes_for, policy_for

__all__ = ["act_after_cancel"]

log = logging.getLogger(__name__)


def act_after_cancel(job_id: str) -> str | None:
    """Once a job's ``cancelled`` row is committed: resume it if its policy says so (and it may).
    Returns the new job's id, or None. Never raises: the stop is already recorded."""
    try:
        return _act(job_id)
    except AndonError as exc:
        log.warning("policy for %s not applied: %s", job_id, exc)
    except Exception:
        log.exception("policy for %s failed", job_id)
    return None


def _act(job_id: str) -> str | None:
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None or job.status != JobStatus.CANCELLED.value or not job.cancellation_reason:
            return None
        reason, source, pipeline = CancellationReason(job.cancellation_reason), job.cancellation_source, job.pipeline
    action = policy_for(pipeline)[reason]
    if action in (FINAL, RESUMABLE) or source == CancellationSource.SUPERSEDED.value:
        return None
    limit = max_resumes_for(pipeline)
    done = _policy_resumes_before(job_id)
    if done >= limit:
        with session_scope() as session:
            job_rows.add_event(session, job_id, EventKind.RESUMED, actor="policy",
                               detail={"policy": action, "skipped": f"resumed by policy {done} times already "
                                                                   f"(max_resumes {limit})"})
        return None
    queue = action[len(REQUEUE):] if action.startswith(REQUEUE) else None
    return resume.resume_job(job_id, force=True, actor=f"policy:{action}", queue=queue,
                             detail={"policy": action, "reason": reason.value, "by_policy": True})


def _policy_resumes_before(job_id: str) -> int:
    """How many jobs up this one's chain of resumes were made by a policy (itself included)."""
    count, current = 0, job_id
    with session_scope() as session:
        for _ in range(100):
            made_by_policy = session.scalar(select(JobEvent.id).where(
                JobEvent.job_id == current, JobEvent.kind == EventKind.RESUMED.value,
                JobEvent.actor.like("policy:%")).limit(1))
            count += made_by_policy is not None
            current = session.scalar(select(Job.resumed_from).where(Job.id == current))
            if current is None:
                break
    return count
