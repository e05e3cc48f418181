"""/api/chains and /api/chords — jobs that wait for other jobs, submitted in one request."""

from __future__ import annotations

from fastapi import APIRouter, status

from api import idempotency, service
from api.deps import WriterDep
from api.routes.jobs import BAD_BODY
from api.schemas import ChainRequest, ChainResponse, ChordRequest, ChordResponse

router = APIRouter(prefix="/api", tags=["jobs"])
RESPONSES = {**BAD_BODY, **idempotency.RESPONSES,
             422: {"description": "a malformed step: the location names it (`body.jobs.2.items.0`)"}}


@router.post("/chains", status_code=status.HTTP_202_ACCEPTED, response_model=ChainResponse, responses=RESPONSES)
def submit_chain(body: ChainRequest, caller: WriterDep,
                 idempotency_key: idempotency.IdempotencyKeyHeader = None) -> ChainResponse:
    """Jobs run one after another: each starts when the one before it completes; when one fails or
    is cancelled, the rest end `dependency_failed` without running. Every step is checked like a
    submit before any job is made; `job_ids` are in step order. Steps don't pass results on."""
    return idempotency.respond(caller, idempotency_key, "POST /api/chains", body,
                               lambda: service.submit_chain_request(body, actor=caller.actor, tenant=caller.tenant))


@router.post("/chords", status_code=status.HTTP_202_ACCEPTED, response_model=ChordResponse, responses=RESPONSES)
def submit_chord(body: ChordRequest, caller: WriterDep,
                 idempotency_key: idempotency.IdempotencyKeyHeader = None) -> ChordResponse:
    """Header jobs run in parallel, then the body job; when a header job fails or is cancelled, the
    body ends `dependency_failed` without running. `job_ids`: the header's, then the body's."""
    return idempotency.respond(caller, idempotency_key, "POST /api/chords", body,
                               lambda: service.submit_chord_request(body, actor=caller.actor, tenant=caller.tenant))
