"""/api/admin — operations across every tenant's jobs: retention."""

from __future__ import annotations

from fastapi import APIRouter

from api import service
from api.deps import OperatorDep
from api.schemas import ErrorResponse, PruneRequest, PruneResponse

router = APIRouter(prefix="/api/admin", tags=["admin"])


@router.post("/prune", response_model=PruneResponse,
             responses={400: {"model": ErrorResponse, "description": "the body could not be parsed"},
                        403: {"model": ErrorResponse, "description": "with tenants set: not the admin token"}})
def prune(body: PruneRequest, caller: OperatorDep) -> PruneResponse:
    """Delete jobs that ended more than `older_than_s` seconds ago, with their items, events and tags,
    1,000 jobs per transaction (running jobs' writes go on in between). Unfinished jobs are never
    deleted. With tenants set, only `ANDON_ADMIN_TOKEN` may call it."""
    return PruneResponse(deleted=service.prune_jobs(body.older_than_s))
