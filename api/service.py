"""The service layer both front doors call: submit, list, show, cancel, partial results.

Routes and CLI commands are a few lines each over these functions; nothing here knows about HTTP.
Errors are :mod:`tasks.errors` exceptions that each front door turns into a 4xx or a one-line message.
"""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn

from celery import chain, chord
from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import selectinload

from api.schemas import (
    BulkCancelResponse,
    CancelLatency,
    CancelResponse,
    FailedItem,
    InterruptedItem,
    JobView,
    PartialResultView,
    PipelineView,
    ResumeResponse,
    SubmitResponse,
)
from db import jobs as job_rows
from db.models import Job, JobItem
from db.session import session_scope
from db.vocabulary import (
    TERMINAL_STATUSES,
    CancellationReason,
    CancellationSource,
    ItemStatus,
    JobStatus,
)
from tasks import control, lifecycle, registry, resume
from tasks.control import cancel_children, enqueue, job_signature, request_cancel, settle_children
from tasks.errors import BrokerUnavailable, InvalidInput, InvalidParent, JobNotFound
from tasks.intake import check_storable, check_submission, unstorable
from tasks.tags import check_tags
from tasks.webhooks import check_callback_url


def _ms(start, end) -> float | None:
    return round((end - start).total_seconds() * 1000, 3) if start and end else None


def _latency(job: Job) -> CancelLatency | None:
    if job.cancel_requested_at is None:
        return None
    return CancelLatency(request_to_observe_ms=_ms(job.cancel_requested_at, job.cancel_observed_at),
                        observe_to_stop_ms=_ms(job.cancel_observed_at, job.finished_at))


def _view(job: Job) -> JobView:
    return JobView(
        job_id=job.id,
        pipeline=job.pipeline,
        status=JobStatus(job.status),
        cancelled=job.status == JobStatus.CANCELLED,
        cancellation_reason=job.cancellation_reason,
        cancellation_message=job.cancellation_message,
        cancellation_source=job.cancellation_source,
        total_items=job.total_items,
        completed_items=job.completed_items,
        failed_items=job.failed_items,
        resumable=job.resumable,
        error=job.error,
        created_at=job.created_at,
        started_at=job.started_at,
        cancel_requested_at=job.cancel_requested_at,
        cancel_observed_at=job.cancel_observed_at,
        finished_at=job.finished_at,
        cancel_latency=_latency(job),
        resumed_from=job.resumed_from,
        parent_job_id=job.parent_job_id,
        tags=job.tags,
    )


def check_job_id(job_id: str) -> None:
    """JobNotFound for an id no job can have (text the database can't even compare: a NUL byte makes
    PostgreSQL raise) — before it reaches a query."""
    if unstorable(job_id):
        raise JobNotFound(job_id)


def _visible(session, job_id: str, tenant: str | None) -> Job:
    """The job, if it exists and ``tenant`` may see it; else JobNotFound (404, never 403: ids don't leak)."""
    check_job_id(job_id)
    job = session.get(Job, job_id)
    if job is None or (tenant is not None and job.tenant != tenant):
        raise JobNotFound(job_id)
    return job


def check_visible(job_id: str, tenant: str | None) -> None:
    check_job_id(job_id)
    if tenant is not None:
        with session_scope() as session:
            _visible(session, job_id, tenant)


def submit_job(
    items: list[Any],
    options: dict[str, Any] | None = None,
    deadline_s: float | None = None,
    actor: str | None = None,
    queue: str | None = None,
    parent_job_id: str | None = None,
    tenant: str | None = None,
    tags: list[str] | None = None,
    pipeline: str = "documents",
    items_field: str = "items",
    callback_url: str | None = None,
) -> SubmitResponse:
    """Check the submission, make the job row, commit, *then* enqueue (the worker must find the row).

    With a parent, the job waits for it: enqueued when the parent completes, cancelled with
    ``dependency_failed`` (never run) if the parent fails or is cancelled.
    """
    job_id = str(uuid.uuid4())
    submission = check_submission(pipeline, items, options, items_field=items_field)
    options = submission.options
    queue = queue or submission.pipeline.queue
    tags = check_tags(tags or [])
    if callback_url is not None:
        check_callback_url(callback_url)
    with session_scope() as session:
        parent_status = None
        if parent_job_id is not None:
            try:
                parent = _visible(session, parent_job_id, tenant)
            except JobNotFound:
                raise InvalidParent(f"parent job {parent_job_id} not found") from None
            parent_status = JobStatus(parent.status)
        deferred = parent_status is not None and not parent_status.is_terminal
        job_rows.create_job(session, job_id, submission.items, options, pipeline=submission.pipeline.name, queue=queue,
                            deadline_s=deadline_s, parent_job_id=parent_job_id, deferred=deferred, tenant=tenant,
                            tags=tags, actor=actor, callback_url=callback_url)
    if parent_status is not None and parent_status is not JobStatus.COMPLETED:
        if parent_status.is_terminal:  # the parent already failed or was cancelled: never run
            cancel_children(parent_job_id, f"parent job {parent_job_id} {parent_status.value}", actor)
            return SubmitResponse(job_id=job_id, status=JobStatus.CANCELLED)
        settle_children(parent_job_id)  # the parent may have ended while we were writing the row
        return SubmitResponse(job_id=job_id, status=JobStatus.PENDING)
    try:
        enqueue(job_id, options, queue)
    except Exception as exc:
        _fail_unsent(job_id, exc)
    return SubmitResponse(job_id=job_id, status=JobStatus.PENDING)


def _fail_unsent(job_id: str, exc: Exception) -> NoReturn:
    """The row exists but the job can't be queued: end it ``failed`` (never ``pending`` forever)."""
    why = " ".join(str(exc).split()) or type(exc).__name__  # one line, whatever the broker client said
    lifecycle.end_failed(job_id, f"could not enqueue: {why}")
    raise BrokerUnavailable(f"could not enqueue job {job_id}: {why}") from exc


def submit_chain(item_sets: list[list[Any]], options: dict[str, Any] | None = None,
                 queue: str | None = None, actor: str | None = None, pipeline: str = "documents",
                 tenant: str | None = None) -> list[str]:
    """Run jobs one after another as a Celery chain: each step's row names the previous as parent.

    Celery sends a step only after the previous one succeeded; when a step fails or is cancelled,
    andon ends the later rows ``cancelled`` / ``dependency_failed`` and they show REVOKED or FAILURE
    in the result backend, never PENDING forever.
    """
    steps = [check_submission(pipeline, items, options) for items in item_sets]
    job_ids = [str(uuid.uuid4()) for _ in steps]
    with session_scope() as session:
        for i, (job_id, step) in enumerate(zip(job_ids, steps)):
            job_rows.create_job(session, job_id, step.items, step.options, pipeline=step.pipeline.name, actor=actor,
                                parent_job_id=job_ids[i - 1] if i else None, tenant=tenant,
                                queue=queue or step.pipeline.queue)
    chain(job_signature(job_id, step.options, queue or step.pipeline.queue)
          for job_id, step in zip(job_ids, steps)).apply_async()
    return job_ids


def submit_chord(header_sets: list[list[Any]], body_items: list[Any], options: dict[str, Any] | None = None,
                 queue: str | None = None, actor: str | None = None, pipeline: str = "documents",
                 tenant: str | None = None) -> tuple[list[str], str]:
    """Run header jobs in parallel, then a body job, as a Celery chord; returns (header ids, body id).

    The body's row waits for every header job (``job_parents``): if any of them fails or is
    cancelled, andon ends the body ``cancelled`` / ``dependency_failed`` at once, and Celery, once
    every header has returned, marks the body FAILURE (ChordError) instead of running it.
    """
    headers = [check_submission(pipeline, items, options) for items in header_sets]
    body = check_submission(pipeline, body_items, options)
    header_ids = [str(uuid.uuid4()) for _ in headers]
    body_id = str(uuid.uuid4())
    with session_scope() as session:
        for job_id, step in zip(header_ids, headers):
            job_rows.create_job(session, job_id, step.items, step.options, pipeline=step.pipeline.name, actor=actor,
                                tenant=tenant, queue=queue or step.pipeline.queue)
        job_rows.create_job(session, body_id, body.items, body.options, pipeline=body.pipeline.name,
                            waits_for=header_ids, actor=actor, tenant=tenant, queue=queue or body.pipeline.queue)
    chord(job_signature(job_id, step.options, queue or step.pipeline.queue)
          for job_id, step in zip(header_ids, headers))(job_signature(body_id, body.options, queue or body.pipeline.queue))
    return header_ids, body_id


def list_pipelines() -> list[PipelineView]:
    return [PipelineView(**pipeline.describe()) for pipeline in registry.pipelines()]


def list_jobs(status: JobStatus | None = None, limit: int = 50, tenant: str | None = None,
              tag: str | None = None, pipeline: str | None = None, reason: CancellationReason | None = None,
              resumed_from: str | None = None) -> list[JobView]:
    return page_jobs(JobFilter(status, tag, pipeline, reason, resumed_from), limit, tenant=tenant)[0]


@dataclass(frozen=True)
class JobFilter:
    """Which jobs a list (or a count) is about; every field given must match (AND)."""

    status: JobStatus | None = None
    tag: str | None = None
    pipeline: str | None = None
    reason: CancellationReason | None = None
    resumed_from: str | None = None
    #: Only jobs not yet terminal (what a bulk cancel would touch).
    unfinished: bool = False

    def where(self, query, tenant: str | None):
        if self.tag is not None:
            check_tags([self.tag])
            query = query.where(job_rows.tagged(self.tag))
        for column, value in ((Job.status, self.status), (Job.pipeline, self.pipeline),
                              (Job.cancellation_reason, self.reason), (Job.resumed_from, self.resumed_from),
                              (Job.tenant, tenant)):
            if value is not None:
                query = query.where(column == str(value))
        if self.unfinished:
            query = query.where(Job.status.not_in([s.value for s in TERMINAL_STATUSES]))
        return query


def page_jobs(which: JobFilter, limit: int = 50, cursor: str | None = None,
              tenant: str | None = None) -> tuple[list[JobView], str | None]:
    """One page of jobs, newest first, and the cursor of the next page (None on the last).

    Keyset pagination on ``(created_at, id)``: a page costs the same at row 100,000 as at row 0, and
    jobs submitted meanwhile don't shift the pages after them. ``cursor`` is opaque to clients."""
    with session_scope() as session:
        query = which.where(select(Job).options(selectinload(Job.tag_rows)), tenant)
        if cursor is not None:
            created_at, job_id = _decode_cursor(cursor)
            query = query.where(or_(Job.created_at < created_at,
                                    and_(Job.created_at == created_at, Job.id > job_id)))
        rows = list(session.scalars(query.order_by(Job.created_at.desc(), Job.id).limit(limit + 1)))
        views = [_view(job) for job in rows[:limit]]
    return views, (_encode_cursor(rows[limit - 1]) if len(rows) > limit else None)


def count_jobs(which: JobFilter, tenant: str | None = None) -> int:
    with session_scope() as session:
        return session.scalar(which.where(select(func.count()).select_from(Job), tenant)) or 0


def _encode_cursor(job: Job) -> str:
    raw = json.dumps([job.created_at.isoformat(), job.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        created_at, job_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return datetime.fromisoformat(created_at), str(job_id)
    except (ValueError, TypeError) as exc:
        raise InvalidInput([{"loc": ("query", "cursor"), "msg": "not a cursor this API gave out",
                             "type": "value_error"}]) from exc


def get_job(job_id: str, tenant: str | None = None) -> JobView:
    with session_scope() as session:
        return _view(_visible(session, job_id, tenant))


def cancel_job(
    job_id: str,
    reason: CancellationReason = CancellationReason.USER_REQUESTED,
    message: str | None = None,
    source: CancellationSource = CancellationSource.API,
    actor: str | None = None,
    cascade: bool = True,
    tenant: str | None = None,
) -> CancelResponse:
    check_storable(message, ["body", "message"])
    check_visible(job_id, tenant)
    outcome = request_cancel(job_id, reason, message, source, actor, cascade=cascade)
    note = "Cancellation requested" if outcome.won else f"Cancellation already requested ({outcome.request.reason})"
    return CancelResponse(job_id=job_id, status=outcome.status, message=note)


def cancel_matching(
    status: JobStatus | None = None,
    parent_job_id: str | None = None,
    tag: str | None = None,
    reason: CancellationReason = CancellationReason.USER_REQUESTED,
    message: str | None = None,
    source: CancellationSource = CancellationSource.API,
    actor: str | None = None,
    tenant: str | None = None,
) -> BulkCancelResponse:
    check_storable(message, ["body", "message"])
    check_storable(parent_job_id, ["body", "parent_job_id"])
    if tag is not None:
        check_tags([tag])
    outcome = control.cancel_matching(status, parent_job_id, tag, reason, message, source, actor, tenant=tenant)
    return BulkCancelResponse(matched=outcome.matched, cancelled=outcome.cancelled, cancelling=outcome.cancelling)


def resume_job(job_id: str, force: bool = False, actor: str | None = None,
               tenant: str | None = None) -> ResumeResponse:
    check_visible(job_id, tenant)
    new_id = resume.resume_job(job_id, force=force, actor=actor)
    return ResumeResponse(job_id=new_id, resumed_from=job_id, status=JobStatus.PENDING)


def partial_results(job_id: str, tenant: str | None = None) -> PartialResultView:
    """Everything a job finished, in item order, whatever way it stopped; and what was in flight."""
    with session_scope() as session:
        job = _visible(session, job_id, tenant)
        items = session.scalars(select(JobItem).where(JobItem.job_id == job_id).order_by(JobItem.index)).all()
    done = [item for item in items if item.status == ItemStatus.DONE]
    failed = [item for item in items if item.status == ItemStatus.FAILED]
    interrupted = [item for item in items if item.status == ItemStatus.INTERRUPTED]
    if job.status == JobStatus.COMPLETED:
        status = "complete"
    else:
        status = "partial" if done else "empty"
    total = job.total_items
    return PartialResultView(
        job_id=job_id,
        pipeline=job.pipeline,
        status=status,
        job_status=JobStatus(job.status),
        completion_percent=round(100.0 * len(done) / total, 1) if total else 0.0,
        total_items=total,
        completed_items=len(done),
        results=[_result_entry(job.pipeline, item) for item in done],
        failed_items=[FailedItem(index=item.index, stage=item.stage, error=item.error, partial=item.result)
                      for item in failed],
        interrupted_items=[InterruptedItem(index=item.index, stage=item.stage, partial=item.result)
                           for item in interrupted],
        cancelled_at_item=job.cancelled_at_item,
    )


def _result_entry(pipeline: str, item: JobItem) -> dict[str, Any]:
    """``{"index", "result"}``; the built-in ``documents`` pipeline keeps its fields flat beside
    ``index``, as it always has."""
    if pipeline == "documents" and isinstance(item.result, dict):
        return {"index": item.index, **item.result}
    return {"index": item.index, "result": item.result}
