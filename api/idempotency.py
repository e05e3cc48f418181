"""Idempotent submits: a request retried with the same ``Idempotency-Key`` gets the first answer.

The same key (per tenant, for 24 hours) replays the first response — same status, same body, so the
same ``job_id`` — and runs nothing; the same key with another request (another route, or a body
that validates to something else) is a 409. While the first request runs, a second one with its key
waits for its answer (polling the row, at most :data:`WAIT_S` seconds, then 409).

The key is taken by inserting its row before the request runs (the database's primary key decides
who was first, across API processes). A request that raises frees its key again: errors are not
replayed, so a retry after a 422 or a 503 runs anew. Its honest limit: an API process that dies
between taking a key and answering leaves the key held; it is taken over after :data:`ABANDONED_S`.

``run_once`` is the service function (the CLI calls it too); ``respond`` is the one line a route adds.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Annotated, Any

from fastapi import Header
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from api.deps import Caller
from api.schemas import KEY_PATTERN
from db import idempotency as rows
from db.models import utcnow
from tasks.errors import IdempotencyConflict

#: How long a key's answer is replayed.
TTL = timedelta(hours=24)
#: How long a second request waits for the first one's answer.
WAIT_S = 30.0
#: A key taken this long ago and still unanswered is free again (its request's process died).
ABANDONED_S = 300.0
_POLL_S = 0.05

IdempotencyKeyHeader = Annotated[str | None, Header(
    alias="Idempotency-Key", pattern=KEY_PATTERN,
    description="Retry-safe submit: the same key (per tenant, 24 h) replays the first response; the same "
                "key with another body is a 409. 1-128 characters from `A-Z a-z 0-9 . _ : / @ + = -`.")]

#: What the OpenAPI schema says a route with the header may also answer.
RESPONSES: dict[int | str, dict[str, Any]] = {
    409: {"description": "the Idempotency-Key was used for another request (or its first request is still "
                         "running after the wait)"}}


def request_hash(route: str, body: BaseModel | Any) -> str:
    """What a request asked for: its route and its body *as validated* (defaults filled in, so two
    spellings of one body are one request)."""
    data = body.model_dump(mode="json") if isinstance(body, BaseModel) else jsonable_encoder(body)
    canonical = json.dumps([route, data], sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def run_once(tenant: str | None, key: str, route: str, body: BaseModel | Any, status_code: int,
             run: Callable[[], Any]) -> tuple[int, Any, bool]:
    """``run()`` once per key: returns ``(status_code, JSON body, replayed)``.

    Raises IdempotencyConflict when the key belongs to another request, or its first request is
    still running after :data:`WAIT_S` seconds."""
    digest = request_hash(route, body)
    deadline = time.monotonic() + WAIT_S
    while True:
        now = utcnow()
        held = rows.claim(tenant, key, digest, expired_before=now - TTL,
                          abandoned_before=now - timedelta(seconds=ABANDONED_S))
        if held is None:
            break
        if held.request_hash != digest:
            raise IdempotencyConflict(f"Idempotency-Key {key!r} was already used for a different request")
        if held.status_code is not None:
            return held.status_code, held.response, True
        if time.monotonic() > deadline:
            raise IdempotencyConflict(f"the first request with Idempotency-Key {key!r} is still running; "
                                      "retry later")
        time.sleep(_POLL_S)  # the first request is running: wait for its answer (or for it to give up)
    try:
        answer = jsonable_encoder(run())
    except BaseException:
        rows.release(tenant, key, digest)
        raise
    rows.answer(tenant, key, digest, status_code, answer)
    return status_code, answer, False


def respond(caller: Caller, key: str | None, route: str, body: BaseModel, run: Callable[[], Any],
            status_code: int = 202) -> Any:
    """A route's answer: ``run()`` itself without a key; with one, the key's first answer."""
    if key is None:
        return run()
    code, answer, replayed = run_once(caller.tenant, key, route, body, status_code, run)
    return JSONResponse(answer, status_code=code, headers={"Idempotent-Replayed": "true" if replayed else "false"})
