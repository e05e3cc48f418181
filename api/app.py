"""The FastAPI app: ``uvicorn api.app:app``. OpenAPI at /docs."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import metrics, progress, ui
from api.heap import freeze_startup_heap
from api.hosts import HostAllowlist
from api.routes import admin, chains, events, jobs, ops, pipelines
from db.session import checkpoint_in_background
from db.settings import get_settings
from tasks import notify, policy, registry
from tasks.errors import (
    AndonError,
    BrokerUnavailable,
    IdempotencyConflict,
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
    policy.check_global()
    checkpoint_in_background()  # SQLite: no WAL checkpoint inside a request's commit
    settings = get_settings()
    if not settings.api_token and not settings.api_tokens:
        log.warning("ANDON_API_TOKEN is not set: anyone who can reach this API can submit and cancel jobs")
    elif settings.public_reads and not settings.api_tokens:
        log.warning("ANDON_PUBLIC_READS=1: anyone who can reach this API can read every job and its results")
    freeze_startup_heap()  # last: what start-up loaded is never walked by a full GC again
    yield
    await progress.changes.close()


DESCRIPTION = """Structured cancellation for Celery AI pipelines.

**Limits.** Every request body is at most `ANDON_MAX_BODY_BYTES` (default 16 MiB), counted before
it is parsed and before the token is checked: a larger one, with or without `Content-Length`, is
answered **413**. A `POST` under `/api` that carries a body must say `Content-Type: application/json`
(**415** otherwise); one without a body may leave it out, unless it comes from a browser page
(`Origin` or `Sec-Fetch-Site` set) — so a cross-site form or no-cors fetch can't cancel a job.
At most `ANDON_MAX_STREAMS` (default 100) event streams are open at once per tenant (per client
address without tenants); one more is answered **429**.

**Access.** With `ANDON_API_TOKEN` set, every `/api` route needs `Authorization: Bearer <token>`,
reads included, unless `ANDON_PUBLIC_READS=1`; with tenants (`ANDON_API_TOKENS`) every `/api` route
needs a tenant's token and sees that tenant's jobs only. `ANDON_ADMIN_TOKEN` sees every tenant's
jobs; with tenants set it alone may cancel across tenants and read `/metrics`. A request whose `Host`
is not in `ANDON_ALLOWED_HOSTS` (default `localhost,127.0.0.1,::1`, plus the address it arrived on)
is answered **400**. `/healthz` (liveness) is always open; `/readyz` answers **503** naming the
dependency (database, Redis) that doesn't answer.

**Text.** Strings the database can't store — a NUL character (`\\u0000`) or a lone UTF-16 surrogate,
anywhere in items, documents, options (keys too) or messages — are answered **422** naming the field.
"""

app = FastAPI(
    title="andon",
    version="0.1.0",
    description=DESCRIPTION,
    lifespan=lifespan,
)
app.include_router(jobs.router)
app.include_router(chains.router)
app.include_router(pipelines.router)
app.include_router(ops.router)
app.include_router(admin.router)
app.include_router(events.router)
app.include_router(ui.router)  # the dashboard: /ui, /ui/jobs/{id}
metrics.register()
notify.install()  # rows this process writes (API cancels, resumes) wake the event streams too


def _json_type(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == "application/json"


async def _refuse(send: Send, code: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": code,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    pass


class RequestLimits:
    """Body size and write content type, checked before routing, parsing and auth (pure ASGI).

    A declared ``Content-Length`` above the limit is refused before a byte of body is read; a body
    without one (chunked) is read here, up to the limit, and handed on only if it fits. A request
    the limits refuse is answered and its connection closed; the app never sees it.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = get_settings().max_body_bytes
        headers = Headers(scope=scope)
        length, chunked = headers.get("content-length"), "transfer-encoding" in headers
        if length is not None and (not length.isdigit() or int(length) > limit):
            await _refuse(send, 413, f"request body larger than {limit} bytes (ANDON_MAX_BODY_BYTES)"
                          if length.isdigit() else "invalid Content-Length")
            return
        if scope["method"] == "POST" and scope["path"].startswith("/api/"):
            has_body = chunked or (length is not None and int(length) > 0)
            content_type = headers.get("content-type")
            browser = "origin" in headers or "sec-fetch-site" in headers
            if not _json_type(content_type or "") and (has_body or content_type is not None or browser):
                await _refuse(send, 415, "a POST to /api must send Content-Type: application/json"
                              + (f" (got {content_type!r})" if content_type else ""))
                return
        if chunked:
            try:
                receive = await self._read_whole(receive, limit)
            except _BodyTooLarge:
                await _refuse(send, 413, f"request body larger than {limit} bytes (ANDON_MAX_BODY_BYTES)")
                return
        await self.app(scope, receive, send)

    @staticmethod
    async def _read_whole(receive: Receive, limit: int) -> Receive:
        """Read a body of unknown length up to ``limit`` bytes; a ``receive`` that replays it."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: let the app see that
                replay: list[Message] = [message]
                break
            size += len(message.get("body", b""))
            if size > limit:
                raise _BodyTooLarge
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
                break

        async def replayed() -> Message:
            return replay.pop(0) if replay else await receive()

        return replayed


app.add_middleware(RequestLimits)
app.add_middleware(HostAllowlist)  # added last: runs first, before any byte of body is read


def _openapi() -> dict[str, Any]:
    """The generated schema, plus the answers RequestLimits gives on every write under /api."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
        for path, operations in schema.get("paths", {}).items():
            for method, operation in operations.items():
                responses = operation.setdefault("responses", {})
                responses.setdefault("413", {"description": "request body larger than ANDON_MAX_BODY_BYTES",
                                             **error})
                if method == "post" and path.startswith("/api/"):
                    responses.setdefault("415", {"description": "Content-Type is not application/json", **error})
        app.openapi_schema = schema
    return app.openapi_schema


app.openapi = _openapi  # type: ignore[method-assign]

#: How each andon error reaches an HTTP client: a status and a one-line ``detail``.
_ERROR_STATUS: dict[type[AndonError], int] = {
    JobNotFound: 404,
    JobAlreadyTerminal: 400,
    NotResumable: 400,
    BrokerUnavailable: 503,
    IdempotencyConflict: 409,
    InvalidParent: 422,
    InvalidTag: 422,
    UnknownPipeline: 422,
}


class ErrorJSONResponse(JSONResponse):
    """An error that may echo what the caller sent: a lone surrogate (``"\\ud800"`` parses, but UTF-8
    can't encode it) goes out escaped, NaN and Infinity (Python's json parses those too) as strings —
    so that rendering the 4xx can't itself become a 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(_finite(content), ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


@app.exception_handler(RequestValidationError)
def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return ErrorJSONResponse({"detail": jsonable_encoder(exc.errors())}, status_code=422)


@app.exception_handler(AndonError)
def andon_error(_: Request, exc: AndonError) -> JSONResponse:
    if isinstance(exc, InvalidInput):  # the shape FastAPI gives its own 422s: a list naming each field
        return ErrorJSONResponse({"detail": exc.errors}, status_code=422)
    code = next((c for t, c in _ERROR_STATUS.items() if isinstance(exc, t)), 400)
    return ErrorJSONResponse({"detail": str(exc)}, status_code=code)
