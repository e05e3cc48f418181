"""After a job's ``cancelled`` row is committed, its policy may resume it (:mod:`tasks.policy`)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from db import jobs as job_rows
from db.models import Job, JobEvent
from db.session import session_scope
from db.vocabulary import CancellationReason, CancellationSource, EventKind, JobStatus
from tasks import registry, resume
from tasks.errors import AndonError
from tasks.policy import FINAL, NEVER_AUTOMATIC, REQUEUE, RESUMABLE, max_resumes_for, policy_for

__all__ = ["act_after_cancel", "apply_pending_policies"]

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
            if not _skip_recorded(session, job_id):
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


def _skip_recorded(session, job_id: str) -> bool:
    return session.scalar(select(JobEvent.id).where(
        JobEvent.job_id == job_id, JobEvent.kind == EventKind.RESUMED.value, JobEvent.actor == "policy").limit(1)) \
        is not None


def apply_pending_policies(within_s: float = 24 * 3600, grace_s: float = 5.0, limit: int = 500) -> list[str]:
    """The policy step for jobs whose cancelling process couldn't take it: it died right after the
    commit, or the broker was away when it tried to queue the resume. Run by the reaper's sweep:
    every job cancelled (more than ``grace_s`` ago, less than ``within_s``) for a reason some policy
    resumes automatically, and neither resumed nor skipped yet, gets its policy applied now. Returns
    the new jobs' ids."""
    automatic = {reason.value for reason in CancellationReason if reason not in NEVER_AUTOMATIC
                 and any(policy_for(p)[reason] not in (FINAL, RESUMABLE) for p in (None, *registry.names()))}
    if not automatic:
        return []
    now = datetime.now(UTC)
    skipped = select(JobEvent.job_id).where(JobEvent.kind == EventKind.RESUMED.value, JobEvent.actor == "policy")
    with session_scope() as session:
        pending = list(session.scalars(select(Job.id).where(
            Job.status == JobStatus.CANCELLED.value, Job.resumed_by.is_(None),
            Job.cancellation_reason.in_(automatic),
            Job.cancellation_source != CancellationSource.SUPERSEDED.value,
            Job.finished_at < now - timedelta(seconds=grace_s), Job.finished_at > now - timedelta(seconds=within_s),
            Job.id.not_in(skipped)).limit(limit)))
    resumed = []
    for job_id in pending:
        new_id = act_after_cancel(job_id)
        if new_id:
            resumed.append(new_id)
    return resumed
