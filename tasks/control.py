"""Control operations on jobs — plain functions every front door calls (API, CLI, revoke, timers).

Like rq's ``send_stop_job_command``: one function to request a cancel, whoever asks.
"""

from __future__ import annotations

from dataclasses import dataclass

from db import jobs as job_rows
from db.models import Job
from db.session import session_scope
from tasks.errors import JobAlreadyTerminal, JobNotFound
from tasks.store import get_store
from tasks.token import CancelRequest
from tasks.vocabulary import CancellationReason, CancellationSource, EventKind, JobStatus


@dataclass(frozen=True)
class CancelOutcome:
    job_id: str
    status: JobStatus  # cancelled (was queued) or cancelling (running; stops at its next checkpoint)
    won: bool  # False: an earlier cancel had already fixed the reason
    request: CancelRequest  # the winning request


def request_cancel(
    job_id: str,
    reason: CancellationReason | str = CancellationReason.USER_REQUESTED,
    message: str | None = None,
    source: CancellationSource | str = CancellationSource.API,
    actor: str | None = None,
) -> CancelOutcome:
    """Ask a job to stop. Sets its token in Redis (first cancel wins) and records the request.

    A queued job is marked ``cancelled`` at once (the worker will skip it); a running one becomes
    ``cancelling`` and stops at its next checkpoint. Raises JobNotFound / JobAlreadyTerminal.
    """
    reason, source = CancellationReason(reason), CancellationSource(source)
    requested = CancelRequest(reason, message, source)
    # The row changes first, the token second: a worker that observes the token within a millisecond
    # must find the row already `cancelling`, or it could finish before our request is on record.
    with session_scope() as session:
        status = _mark_requested(session, job_id, requested)
        job_rows.add_event(
            session, job_id, EventKind.CANCEL_REQUESTED, reason=reason.value, source=source.value,
            actor=actor, detail={"message": message, "status": status.value}, at=requested.at,
        )
    won, winner = get_store().cancel(job_id, reason, message, source)
    return CancelOutcome(job_id, status, won, winner)


def _mark_requested(session, job_id: str, request: CancelRequest) -> JobStatus:
    """Queued → cancelled at once; running → cancelling. Retries if a worker moves the row meanwhile."""
    values = {**job_rows.cancel_values(request), "cancel_requested_at": request.at}
    for _ in range(5):
        job = session.get(Job, job_id, populate_existing=True)
        if job is None:
            raise JobNotFound(job_id)
        status = JobStatus(job.status)
        if status.is_terminal:
            raise JobAlreadyTerminal(job_id, status.value)
        if status is JobStatus.CANCELLING:
            return status
        if status is JobStatus.PENDING and job_rows.transition(
            session, job_id, JobStatus.CANCELLED, cancelled_at_item=0, **values
        ):
            return JobStatus.CANCELLED
        if status is JobStatus.RUNNING and job_rows.transition(session, job_id, JobStatus.CANCELLING, **values):
            return JobStatus.CANCELLING
    raise JobAlreadyTerminal(job_id, "changing too fast to cancel")
