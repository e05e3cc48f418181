"""/api/events — one stream of every job event the caller's tenant may see (the dashboard's feed)."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, HTTPException, Request, status
from sse_starlette import EventSourceResponse

from api import feed, progress
from api.deps import Caller, ReaderDep
from api.schemas import ErrorResponse
from db.settings import get_settings

router = APIRouter(prefix="/api", tags=["events"])

STREAM_RESPONSES = {
    200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"},
    429: {"model": ErrorResponse, "description": "too many open event streams for this tenant (or client "
                                                 "address): ANDON_MAX_STREAMS"},
}


def take_stream_slot(caller: Caller, request: Request) -> Callable[[], None]:
    """A slot among the caller's ``ANDON_MAX_STREAMS`` open streams (429 when none is free); the
    function returned gives it back."""
    limit = get_settings().max_streams
    who = caller.tenant or (request.client.host if request.client else "unknown")
    release = progress.slots.take(who, limit)
    if release is None:
        raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS,
                            f"too many open event streams: {limit} already open for "
                            f"{'tenant ' + caller.tenant if caller.tenant else 'this client'} "
                            f"(ANDON_MAX_STREAMS); close one and retry",
                            headers={"Retry-After": "1"})
    return release


@router.get("/events", response_class=EventSourceResponse, responses=STREAM_RESPONSES)
async def every_event(caller: ReaderDep, request: Request) -> EventSourceResponse:
    """Every job event the caller may see, as Server-Sent Events, from the moment it opens: first
    `open`, then each job event (`submitted`, `started`, `cancel_requested`, `cancel_observed`,
    `cancelled`, `completed`, `failed`, `resumed`, ...), `item` as each item ends, and `progress`
    (`item`, `stage`) as a running job moves. Every event's data names its `job_id` and carries the
    job's `job_status` and counts. Send the token in the `Authorization` header (read the stream with
    `fetch()`; a browser's EventSource can't send headers). It counts against `ANDON_MAX_STREAMS`."""
    return await feed.open_every(caller.tenant, take_stream_slot(caller, request))
