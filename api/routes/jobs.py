"""/api/jobs — submit, list, show, cancel, partial results."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, status
from sse_starlette import EventSourceResponse

from api import progress, service
from api.deps import ReaderDep, WriterDep
from api.schemas import (
    BulkCancelRequest,
    BulkCancelResponse,
    CancelRequestBody,
    CancelResponse,
    ErrorResponse,
    JobView,
    PartialResultView,
    ResumeResponse,
    SubmitRequest,
    SubmitResponse,
)
from db.settings import get_settings
from db.vocabulary import CancellationSource, JobStatus
from tasks.tags import TAG_PATTERN

router = APIRouter(prefix="/api/jobs", tags=["jobs"])
NOT_FOUND = {404: {"model": ErrorResponse, "description": "no such job"}}
#: FastAPI answers 400 itself for a body it can't decode (not UTF-8, say).
BAD_BODY = {400: {"model": ErrorResponse, "description": "the body could not be parsed"}}


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=SubmitResponse,
             responses={**BAD_BODY, 422: {"description": "malformed body, or parent_job_id names no job"}})
def submit(body: SubmitRequest, caller: WriterDep) -> SubmitResponse:
    """Submit a job: 422 names the field (and the item's index) a pipeline's models reject, or the
    known pipelines when the name is unknown."""
    items, field = body.inputs
    return service.submit_job(items, body.options, body.deadline_s, actor=caller.actor,
                              parent_job_id=body.parent_job_id, tenant=caller.tenant, tags=body.tags,
                              pipeline=body.pipeline, items_field=field)


@router.post("/cancel", status_code=status.HTTP_202_ACCEPTED, response_model=BulkCancelResponse, responses=BAD_BODY)
def cancel_matching(body: BulkCancelRequest, caller: WriterDep) -> BulkCancelResponse:
    """Cancel every unfinished job matching the filter in one pass (queued ones never start)."""
    return service.cancel_matching(JobStatus(body.status) if body.status else None, body.parent_job_id,
                                   body.tag, body.reason, body.message, CancellationSource.API, actor=caller.actor,
                                   tenant=caller.tenant)


@router.get("", response_model=list[JobView])
def list_jobs(
    caller: ReaderDep,
    job_status: Annotated[JobStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    tag: Annotated[str | None, Query(pattern=TAG_PATTERN)] = None,
) -> list[JobView]:
    return service.list_jobs(job_status, limit, tenant=caller.tenant, tag=tag)


@router.get("/{job_id}", response_model=JobView, responses=NOT_FOUND)
def get_job(job_id: str, caller: ReaderDep) -> JobView:
    return service.get_job(job_id, tenant=caller.tenant)


@router.post(
    "/{job_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=CancelResponse,
    responses={**NOT_FOUND, 400: {"model": ErrorResponse, "description": "job already terminal, or a body that "
                                                                    "could not be parsed"}},
)
def cancel(job_id: str, caller: WriterDep, body: CancelRequestBody | None = None) -> CancelResponse:
    body = body or CancelRequestBody()
    return service.cancel_job(job_id, body.reason, body.message, CancellationSource.API, actor=caller.actor,
                              cascade=body.cascade, tenant=caller.tenant)


@router.post(
    "/{job_id}/resume",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ResumeResponse,
    responses={**NOT_FOUND, 400: {"model": ErrorResponse, "description": "job not resumable"}},
)
def resume(job_id: str, caller: WriterDep, force: bool = False) -> ResumeResponse:
    """Start a new job reusing every finished item; only the rest runs. `force` resumes a job
    cancelled for a reason that isn't resumed by default (user_requested, ...)."""
    return service.resume_job(job_id, force=force, actor=caller.actor, tenant=caller.tenant)


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    responses={**NOT_FOUND, 200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"},
               429: {"model": ErrorResponse, "description": "too many open event streams for this tenant "
                                                            "(or client address): ANDON_MAX_STREAMS"}},
)
async def events(job_id: str, caller: ReaderDep, request: Request) -> EventSourceResponse:
    """Progress and state changes as Server-Sent Events, in order; the stream ends with `end` once
    the job is terminal. Closing it only stops watching, never the job. At most `ANDON_MAX_STREAMS`
    streams are open at once per tenant (per client address without tenants); one more is 429."""
    service.check_job_id(job_id)
    limit = get_settings().max_streams
    who = caller.tenant or (request.client.host if request.client else "unknown")
    release = progress.slots.take(who, limit)
    if release is None:
        raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS,
                            f"too many open event streams: {limit} already open for "
                            f"{'tenant ' + caller.tenant if caller.tenant else 'this client'} "
                            f"(ANDON_MAX_STREAMS); close one and retry",
                            headers={"Retry-After": "1"})
    return await progress.open_events(job_id, caller.tenant, release)


@router.get("/{job_id}/partial-results", response_model=PartialResultView, responses=NOT_FOUND)
def partial_results(job_id: str, caller: ReaderDep) -> PartialResultView:
    return service.partial_results(job_id, tenant=caller.tenant)
