"""The FastAPI app: ``uvicorn api.app:app``. OpenAPI at /docs."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api import metrics
from api.routes import jobs, pipelines
from db.settings import get_settings
from tasks import registry
from tasks.errors import (
    AndonError,
    BrokerUnavailable,
    InvalidInput,
    InvalidParent,
    InvalidTag,
    JobAlreadyTerminal,
    JobNotFound,
    NotResumable,
    UnknownPipeline,
)

log = logging.getLogger("andon.api")



@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    registry.load_configured()  # a bad ANDON_PIPELINES stops the API at start, not at the first submit
    if not get_settings().api_token:
        log.warning("ANDON_API_TOKEN is not set: anyone who can reach this API can submit and cancel jobs")
    yield


app = FastAPI(
    title="andon",
    version="0.1.0",
    description="Structured cancellation for Celery AI pipelines.",
    lifespan=lifespan,
)
app.include_router(jobs.router)
app.include_router(pipelines.router)
metrics.register()

#: How each andon error reaches an HTTP client: a status and a one-line ``detail``.
_ERROR_STATUS: dict[type[AndonError], int] = {
    JobNotFound: 404,
    JobAlreadyTerminal: 400,
    NotResumable: 400,
    BrokerUnavailable: 503,
    InvalidParent: 422,
    InvalidTag: 422,
    UnknownPipeline: 422,
}


@app.exception_handler(AndonError)
def andon_error(_: Request, exc: AndonError) -> JSONResponse:
    if isinstance(exc, InvalidInput):  # the shape FastAPI gives its own 422s: a list naming each field
        return JSONResponse({"detail": exc.errors}, status_code=422)
    code = next((c for t, c in _ERROR_STATUS.items() if isinstance(exc, t)), 400)
    return JSONResponse({"detail": str(exc)}, status_code=code)


@app.get("/healthz", tags=["ops"])
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
def metrics() -> PlainTextResponse:
    return PlainTextResponse(generate_latest(), media_type=CONTENT_TYPE_LATEST)
