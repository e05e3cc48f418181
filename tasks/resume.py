"""Resume: keep what was paid for. A new job reuses every finished item of a cancelled one."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError

from db import jobs as job_rows
from db.models import Job, JobEvent, JobItem
from db.session import session_scope
from db.vocabulary import CancellationReason, CancellationSource, EventKind, JobStatus
from tasks import registry
from tasks.errors import AndonError, BrokerUnavailable, JobNotFound, NotResumable, UnknownPipeline
from tasks.sending import enqueue

log = logging.getLogger(__name__)


class ResumeUnavailable(BrokerUnavailable):
    """The resumed job could not be queued (broker or Redis away); nothing was kept, retry later."""


def resume_job(job_id: str, *, force: bool = False, actor: str | None = None, queue: str | None = None,
               detail: dict | None = None) -> str:
    """Start a new job that reuses every finished item of a cancelled one and runs only the rest.

    Resumable without ``force``: jobs whose policy says so (by default those cancelled for
    ``timeout`` or ``system_shutdown``: nothing was wrong with the job). A job is resumed at most once (a unique ``resumed_from``), so two workers
    auto-resuming after the same shutdown can't both do it. Returns the new job's id.
    """
    new_id = str(uuid.uuid4())
    queue_for_new: str | None = queue
    try:
        with session_scope() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise JobNotFound(job_id)
            if job.status != JobStatus.CANCELLED:
                raise NotResumable(f"job {job_id} is {job.status}: only a cancelled job can be resumed")
            if not (job.resumable or force):
                raise NotResumable(f"job {job_id} was cancelled for {job.cancellation_reason}, which is not "
                                   "resumed automatically; resume it explicitly (--force / ?force=true)")
            existing = session.scalar(select(Job.id).where(Job.resumed_from == job_id))
            if existing:
                raise NotResumable(f"job {job_id} was already resumed as {existing}")
            queue_for_new = queue or job.queue or _pipeline_queue(job.pipeline)
            job_rows.create_job(session, new_id, job.inputs, job.options, pipeline=job.pipeline,
                                queue=queue_for_new, deadline_s=job.deadline_s,
                                parent_job_id=job.parent_job_id, resumed_from=job_id, tenant=job.tenant,
                                tags=job.tags, actor=actor)
            reused = job_rows.copy_done_items(session, job_id, new_id)
            job_rows.add_event(session, new_id, EventKind.RESUMED, actor=actor,
                               detail={"resumed_from": job_id, "reused_items": reused, **(detail or {})})
            session.execute(update(Job).where(Job.id == job_id).values(resumed_by=new_id)
                            .execution_options(synchronize_session=False))
    except IntegrityError as exc:  # lost the race to another resumer
        raise NotResumable(f"job {job_id} was already resumed") from exc
    try:
        enqueue(new_id, job.options, queue_for_new)
    except Exception as exc:
        # nothing was queued: take the new job back, so the old one can still be resumed later
        with session_scope() as session:
            session.execute(update(Job).where(Job.id == job_id).values(resumed_by=None)
                            .execution_options(synchronize_session=False))
            session.execute(delete(JobEvent).where(JobEvent.job_id == new_id))
            session.execute(delete(JobItem).where(JobItem.job_id == new_id))
            session.execute(delete(Job).where(Job.id == new_id))
        raise ResumeUnavailable(f"could not enqueue the resumed job for {job_id}: {exc}") from exc
    return new_id


def auto_resume_after_shutdown(hostname: str, within_s: float = 24 * 3600) -> tuple[list[str], int]:
    """Resume the jobs a shutdown of worker ``hostname`` stopped — each once (see :func:`resume_job`).

    Called when a worker comes back under the same node name (``andon up`` keeps it stable).
    Returns the new job ids, and how many could not be queued now (Redis or the broker away) and
    are left resumable for the caller to retry.
    """
    since = datetime.now(UTC) - timedelta(seconds=within_s)
    stopped_here = select(JobEvent.job_id).where(
        JobEvent.kind == EventKind.CANCEL_REQUESTED.value,
        JobEvent.source == CancellationSource.WORKER_SHUTDOWN.value,
        JobEvent.actor == hostname, JobEvent.at >= since,
    )
    resumed_already = select(Job.resumed_from).where(Job.resumed_from.is_not(None))
    with session_scope() as session:
        candidates = list(session.scalars(select(Job.id).where(
            Job.id.in_(stopped_here), Job.status == JobStatus.CANCELLED.value,
            Job.cancellation_reason == CancellationReason.SYSTEM_SHUTDOWN.value,
            Job.resumable.is_(True), Job.id.not_in(resumed_already),
        )))
    resumed, left = [], 0
    for job_id in candidates:
        try:
            resumed.append(resume_job(job_id, actor=f"auto-resume:{hostname}"))
        except NotResumable:
            pass
        except AndonError as exc:
            log.warning("auto-resume of %s failed, left resumable: %s", job_id, exc)
            left += 1
    return resumed, left


def _pipeline_queue(name: str) -> str | None:
    try:
        return registry.get(name).queue
    except UnknownPipeline:
        return None  # a worker that knows it will pick it up from the default queue, or send it back
