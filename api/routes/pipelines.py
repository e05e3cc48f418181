"""/api/pipelines — what this API can run: every registered pipeline and its stages."""

from __future__ import annotations

from fastapi import APIRouter

from api import service
from api.deps import ReaderDep
from api.schemas import PipelineView

router = APIRouter(prefix="/api/pipelines", tags=["pipelines"])


@router.get("", response_model=list[PipelineView])
def list_pipelines(caller: ReaderDep) -> list[PipelineView]:
    return service.list_pipelines()
