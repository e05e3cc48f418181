"""A typed Python client for andon's HTTP API — for other services, and the ``andon`` CLI's job verbs.

```python
from api.client import AndonClient

with AndonClient("http://127.0.0.1:8000", token="...") as andon:
    job = andon.submit(["First document.", "Second one."], options={"stage_delay_s": 0.1})
    andon.cancel(job.job_id, reason="timeout", message="took too long")
    print(andon.wait(job.job_id, timeout=30).status, andon.results(job.job_id).completed_items)
```

:class:`AsyncAndonClient` has the same methods, to ``await`` (``events`` is an ``async for``).
Unset, the URL is ``ANDON_API_URL`` (else the embedded stack's API) and the token ``ANDON_API_TOKEN``.

Every answer the server refuses (4xx, 5xx) raises :class:`AndonAPIError` with its ``status`` and
``detail``; an API that can't be reached raises it too, with ``status`` None. Response models keep
fields this client doesn't know yet (a newer server's), so nothing the server says is dropped.

Only ``httpx`` and ``pydantic`` are needed at import time: no database, broker or Celery.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, TypeAdapter

__all__ = [
    "AndonAPIError", "AndonClient", "AsyncAndonClient", "BatchSubmitted", "BulkCancelled", "CancelAnswer", "Chained",
    "Event",
    "Job", "JobPage", "PartialResults", "PipelineInfo", "Resumed", "Submitted",
]

TERMINAL = frozenset({"cancelled", "completed", "failed"})


# -- what the server answers ---------------------------------------------------------------------------

class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")  # a newer server's fields are kept, and printed back


class Job(_Model):
    """A job, as ``GET /api/jobs/{id}`` shows it."""

    job_id: str
    pipeline: str = "documents"
    status: str
    cancelled: bool = False
    cancellation_reason: str | None = None
    cancellation_message: str | None = None
    cancellation_source: str | None = None
    total_items: int = 0
    completed_items: int = 0
    failed_items: int = 0
    resumable: bool = False
    error: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    cancel_requested_at: datetime | None = None
    cancel_observed_at: datetime | None = None
    finished_at: datetime | None = None
    cancel_latency: dict[str, float | None] | None = None
    resumed_from: str | None = None
    parent_job_id: str | None = None
    tags: list[str] = []

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL


class Submitted(_Model):
    job_id: str
    status: str


class BatchSubmitted(_Model):
    job_ids: list[str]


class Chained(_Model):
    """A chain's job ids in order, or a chord's (header ids, then the body's: ``body_job_id``)."""

    job_ids: list[str]
    body_job_id: str | None = None


class CancelAnswer(_Model):
    job_id: str
    status: str  # cancelling, or cancelled for a job that was still queued
    message: str


class BulkCancelled(_Model):
    matched: int
    cancelled: int
    cancelling: int


class Resumed(_Model):
    job_id: str
    resumed_from: str
    status: str


class PartialResults(_Model):
    job_id: str
    pipeline: str = "documents"
    status: str  # complete, partial or empty
    job_status: str | None = None
    completion_percent: float
    total_items: int
    completed_items: int
    results: list[dict[str, Any]]
    failed_items: list[dict[str, Any]]
    interrupted_items: list[dict[str, Any]] = []
    cancelled_at_item: int | None = None


class PipelineInfo(_Model):
    name: str
    stages: list[str]
    concurrency: int
    description: str | None = None
    queue: str | None = None


@dataclass(frozen=True)
class JobPage:
    """One page of ``GET /api/jobs``; ``next_cursor`` is None on the last."""

    jobs: list[Job]
    next_cursor: str | None


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event of a job: ``event`` is its kind (``progress``, ``item``,
    ``cancel_requested``, ..., and ``end`` last, once the job is terminal)."""

    event: str
    data: dict[str, Any]
    id: str | None = None


_JOBS = TypeAdapter(list[Job])
_PIPELINES = TypeAdapter(list[PipelineInfo])


class AndonAPIError(Exception):
    """The API refused a request (``status`` 4xx/5xx, ``detail`` as it said), or could not be
    reached (``status`` None). ``str()`` is one line a person can act on."""

    def __init__(self, status: int | None, detail: Any, url: str | None = None) -> None:
        self.status = status
        self.detail = detail
        self.url = url
        super().__init__(self._line())

    def _line(self) -> str:
        if isinstance(self.detail, list):  # a 422: each field named
            text = "; ".join(_field_error(entry) for entry in self.detail) or "invalid request"
        else:
            text = str(self.detail)
        text = " ".join(text.split())
        if self.status is None or self.status in (400, 404, 409, 422):
            return text
        return f"{text} (HTTP {self.status})"


def _field_error(entry: Any) -> str:
    if not isinstance(entry, dict):
        return str(entry)
    loc = [str(part) for part in entry.get("loc", []) if part not in ("body", "query", "path")]
    return f"{'.'.join(loc)}: {entry.get('msg', 'invalid')}" if loc else str(entry.get("msg", "invalid"))


# -- how requests are made (shared by both clients) ----------------------------------------------------

@dataclass(frozen=True)
class _Call:
    method: str
    path: str
    params: dict[str, Any] | None = None
    body: Any = None
    headers: dict[str, str] | None = None


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def _submit_body(items: list[Any] | None, pipeline: str | None, documents: list[str] | None,
                 options: dict[str, Any] | None, deadline_s: float | None, tags: list[str] | None,
                 parent_job_id: str | None, callback_url: str | None, extra: dict[str, Any]) -> dict[str, Any]:
    return _drop_none({"pipeline": pipeline, "items": items, "documents": documents, "options": options,
                       "deadline_s": deadline_s, "tags": tags, "parent_job_id": parent_job_id,
                       "callback_url": callback_url, **extra})


def _idempotency(key: str | None) -> dict[str, str] | None:
    return {"Idempotency-Key": key} if key else None


def _list_params(status, tag, pipeline, reason, resumed_from, limit, cursor) -> dict[str, Any]:
    return _drop_none({"status": status, "tag": tag, "pipeline": pipeline, "reason": reason,
                       "resumed_from": resumed_from, "limit": limit, "cursor": cursor})


def _next_cursor(response: httpx.Response) -> str | None:
    link = response.links.get("next")
    if not link or "url" not in link:
        return None
    return (parse_qs(urlsplit(link["url"]).query).get("cursor") or [None])[0]


def _joined(pages: list[PartialResults]) -> PartialResults:
    """The pages of one job's partial results as one: every page's items, the last page's summary."""
    if len(pages) == 1:
        return pages[0]
    return pages[-1].model_copy(update={name: [entry for page in pages for entry in getattr(page, name)]
                                        for name in ("results", "failed_items", "interrupted_items")})


def _check(response: httpx.Response) -> httpx.Response:
    if response.is_success:
        return response
    try:
        detail = response.json().get("detail", response.text)
    except (ValueError, AttributeError):
        detail = response.text.strip() or response.reason_phrase
    raise AndonAPIError(response.status_code, detail, str(response.request.url))


def _unreachable(base_url: str, exc: httpx.TransportError) -> AndonAPIError:
    return AndonAPIError(None, f"cannot reach the API at {base_url} ({type(exc).__name__}: {exc}); "
                               "is `andon up` running, and ANDON_API_URL right?", base_url)


def _headers(token: str | None, client_name: str | None) -> dict[str, str]:
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if client_name:
        headers["X-Andon-Client"] = client_name
    return headers


def _defaults(base_url: str | None, token: str | None) -> tuple[str, str | None]:
    if base_url is None or token is None:
        from db.settings import Settings  # only pydantic-settings; read fresh, not the process's cache

        settings = Settings()
        base_url = base_url or settings.resolved_api_url
        token = token if token is not None else settings.api_token
    return base_url.rstrip("/"), token


class _SSE:
    """Server-Sent Events, line by line (comments are keep-alives, skipped)."""

    def __init__(self) -> None:
        self.event, self.data, self.id = "message", [], None

    def feed(self, line: str) -> Event | None:
        if not line:
            event = Event(self.event, json.loads("\n".join(self.data)), self.id) if self.data else None
            self.event, self.data, self.id = "message", [], None
            return event
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            self.event = value
        elif field == "data":
            self.data.append(value)
        elif field == "id":
            self.id = value
        return None


_STREAM_TIMEOUT = httpx.Timeout(10.0, read=None)


# -- the clients ---------------------------------------------------------------------------------------

class AndonClient:
    """andon's API over HTTP, synchronously (``httpx.Client``)."""

    def __init__(self, base_url: str | None = None, token: str | None = None, *, timeout: float = 30.0,
                 client_name: str | None = None, transport: httpx.BaseTransport | None = None) -> None:
        self.base_url, token = _defaults(base_url, token)
        self._http = httpx.Client(base_url=self.base_url, headers=_headers(token, client_name), timeout=timeout,
                                  transport=transport)

    def __enter__(self) -> AndonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: _Call) -> httpx.Response:
        try:
            response = self._http.request(call.method, call.path, params=call.params, json=call.body,
                                          headers=call.headers)
        except httpx.TransportError as exc:
            raise _unreachable(self.base_url, exc) from None
        return _check(response)

    def submit(self, items: list[Any] | None = None, *, pipeline: str | None = None,
               documents: list[str] | None = None, options: dict[str, Any] | None = None,
               deadline_s: float | None = None, tags: list[str] | None = None, parent_job_id: str | None = None,
               callback_url: str | None = None, idempotency_key: str | None = None, **extra: Any) -> Submitted:
        """``POST /api/jobs``. ``extra``: any other submit field the server takes."""
        body = _submit_body(items, pipeline, documents, options, deadline_s, tags, parent_job_id, callback_url, extra)
        return Submitted.model_validate(self._send(_Call("POST", "/api/jobs", body=body,
                                                         headers=_idempotency(idempotency_key))).json())

    def batch(self, jobs: list[dict[str, Any]], *, idempotency_key: str | None = None) -> BatchSubmitted:
        """``POST /api/jobs/batch``: many submit bodies, all accepted or none (422 names the index)."""
        return BatchSubmitted.model_validate(self._send(_Call("POST", "/api/jobs/batch", body={"jobs": jobs},
                                                              headers=_idempotency(idempotency_key))).json())

    def chain(self, jobs: list[dict[str, Any]], *, idempotency_key: str | None = None) -> Chained:
        """``POST /api/chains``: submit bodies run one after another (a failed one cancels the rest)."""
        return Chained.model_validate(self._send(_Call("POST", "/api/chains", body={"jobs": jobs},
                                                       headers=_idempotency(idempotency_key))).json())

    def chord(self, header: list[dict[str, Any]], body: dict[str, Any], *,
              idempotency_key: str | None = None) -> Chained:
        """``POST /api/chords``: header jobs in parallel, then the body job once they all completed."""
        return Chained.model_validate(self._send(_Call("POST", "/api/chords", body={"header": header, "body": body},
                                                       headers=_idempotency(idempotency_key))).json())

    def get(self, job_id: str) -> Job:
        return Job.model_validate(self._send(_Call("GET", f"/api/jobs/{job_id}")).json())

    def list(self, *, status: str | None = None, tag: str | None = None, pipeline: str | None = None,
             reason: str | None = None, resumed_from: str | None = None, limit: int = 50,
             cursor: str | None = None) -> JobPage:
        """One page, newest first; pass ``next_cursor`` back for the next (or use :meth:`iter_jobs`)."""
        response = self._send(_Call("GET", "/api/jobs", params=_list_params(status, tag, pipeline, reason,
                                                                              resumed_from, limit, cursor)))
        return JobPage(_JOBS.validate_python(response.json()), _next_cursor(response))

    def iter_jobs(self, *, page_size: int = 100, **filters: Any) -> Iterator[Job]:
        """Every job matching ``filters`` (as :meth:`list`), page after page."""
        cursor = None
        while True:
            page = self.list(limit=page_size, cursor=cursor, **filters)
            yield from page.jobs
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def cancel(self, job_id: str, *, reason: str = "user_requested", message: str | None = None,
               cascade: bool = True) -> CancelAnswer:
        body = _drop_none({"reason": reason, "message": message, "cascade": cascade})
        return CancelAnswer.model_validate(self._send(_Call("POST", f"/api/jobs/{job_id}/cancel", body=body)).json())

    def cancel_matching(self, *, status: str | None = None, parent_job_id: str | None = None,
                        tag: str | None = None, reason: str = "user_requested",
                        message: str | None = None) -> BulkCancelled:
        """Bulk cancel: every unfinished job matching all the filters given (at least one)."""
        body = _drop_none({"status": status, "parent_job_id": parent_job_id, "tag": tag, "reason": reason,
                           "message": message})
        return BulkCancelled.model_validate(self._send(_Call("POST", "/api/jobs/cancel", body=body)).json())

    def results(self, job_id: str, *, page_size: int = 1000) -> PartialResults:
        """Every item's partial result, joined from pages of ``page_size`` items (the API's most)."""
        pages, cursor = [], None
        while True:
            response = self._send(_Call("GET", f"/api/jobs/{job_id}/partial-results",
                                        params=_drop_none({"limit": page_size, "cursor": cursor})))
            pages.append(PartialResults.model_validate(response.json()))
            cursor = _next_cursor(response)
            if cursor is None:
                return _joined(pages)

    def resume(self, job_id: str, *, force: bool = False) -> Resumed:
        params = {"force": "true"} if force else None
        return Resumed.model_validate(self._send(_Call("POST", f"/api/jobs/{job_id}/resume", params=params)).json())

    def pipelines(self) -> list[PipelineInfo]:
        return _PIPELINES.validate_python(self._send(_Call("GET", "/api/pipelines")).json())

    def events(self, job_id: str) -> Iterator[Event]:
        """The job's events as they happen, ending with ``end`` once it is terminal. Leaving the loop
        closes the stream (it never affects the job)."""
        try:
            with self._http.stream("GET", f"/api/jobs/{job_id}/events", timeout=_STREAM_TIMEOUT,
                                   headers={"Accept": "text/event-stream"}) as response:
                if not response.is_success:
                    response.read()
                    _check(response)
                parser = _SSE()
                for line in response.iter_lines():
                    event = parser.feed(line)
                    if event is not None:
                        yield event
                        if event.event == "end":
                            return
        except httpx.TransportError as exc:
            raise _unreachable(self.base_url, exc) from None

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Block until the job is terminal and return it; TimeoutError after ``timeout`` seconds.
        Woken by the job's event stream (no polling delay); re-reads the job after each stream."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if job.is_terminal:
                return job
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"job {job_id} is still {job.status} after {timeout}s")
            self._until_end(job_id, deadline)

    def _until_end(self, job_id: str, deadline: float | None) -> None:
        left = 30.0 if deadline is None else max(0.05, min(30.0, deadline - time.monotonic()))
        try:
            with self._http.stream("GET", f"/api/jobs/{job_id}/events", timeout=httpx.Timeout(10.0, read=left),
                                   headers={"Accept": "text/event-stream"}) as response:
                if not response.is_success:
                    return  # the next get() says why
                parser = _SSE()
                for line in response.iter_lines():
                    event = parser.feed(line)
                    if (event is not None and event.event == "end") or (
                            deadline is not None and time.monotonic() >= deadline):
                        return
        except httpx.TimeoutException:
            return
        except httpx.TransportError:
            time.sleep(0.2)  # the API restarting: the next get() tries again (or says it is gone)


class AsyncAndonClient:
    """andon's API over HTTP, with ``async``/``await`` (``httpx.AsyncClient``); as :class:`AndonClient`."""

    def __init__(self, base_url: str | None = None, token: str | None = None, *, timeout: float = 30.0,
                 client_name: str | None = None, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base_url, token = _defaults(base_url, token)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=_headers(token, client_name),
                                       timeout=timeout, transport=transport)

    async def __aenter__(self) -> AsyncAndonClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: _Call) -> httpx.Response:
        try:
            response = await self._http.request(call.method, call.path, params=call.params, json=call.body,
                                                headers=call.headers)
        except httpx.TransportError as exc:
            raise _unreachable(self.base_url, exc) from None
        return _check(response)

    async def submit(self, items: list[Any] | None = None, *, pipeline: str | None = None,
                     documents: list[str] | None = None, options: dict[str, Any] | None = None,
                     deadline_s: float | None = None, tags: list[str] | None = None,
                     parent_job_id: str | None = None, callback_url: str | None = None,
                     idempotency_key: str | None = None, **extra: Any) -> Submitted:
        body = _submit_body(items, pipeline, documents, options, deadline_s, tags, parent_job_id, callback_url, extra)
        response = await self._send(_Call("POST", "/api/jobs", body=body, headers=_idempotency(idempotency_key)))
        return Submitted.model_validate(response.json())

    async def batch(self, jobs: list[dict[str, Any]], *, idempotency_key: str | None = None) -> BatchSubmitted:
        response = await self._send(_Call("POST", "/api/jobs/batch", body={"jobs": jobs},
                                          headers=_idempotency(idempotency_key)))
        return BatchSubmitted.model_validate(response.json())

    async def chain(self, jobs: list[dict[str, Any]], *, idempotency_key: str | None = None) -> Chained:
        response = await self._send(_Call("POST", "/api/chains", body={"jobs": jobs},
                                          headers=_idempotency(idempotency_key)))
        return Chained.model_validate(response.json())

    async def chord(self, header: list[dict[str, Any]], body: dict[str, Any], *,
                    idempotency_key: str | None = None) -> Chained:
        response = await self._send(_Call("POST", "/api/chords", body={"header": header, "body": body},
                                          headers=_idempotency(idempotency_key)))
        return Chained.model_validate(response.json())

    async def get(self, job_id: str) -> Job:
        return Job.model_validate((await self._send(_Call("GET", f"/api/jobs/{job_id}"))).json())

    async def list(self, *, status: str | None = None, tag: str | None = None, pipeline: str | None = None,
                   reason: str | None = None, resumed_from: str | None = None, limit: int = 50,
                   cursor: str | None = None) -> JobPage:
        response = await self._send(_Call("GET", "/api/jobs", params=_list_params(status, tag, pipeline, reason,
                                                                                    resumed_from, limit, cursor)))
        return JobPage(_JOBS.validate_python(response.json()), _next_cursor(response))

    async def iter_jobs(self, *, page_size: int = 100, **filters: Any) -> AsyncIterator[Job]:
        cursor = None
        while True:
            page = await self.list(limit=page_size, cursor=cursor, **filters)
            for job in page.jobs:
                yield job
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def cancel(self, job_id: str, *, reason: str = "user_requested", message: str | None = None,
                     cascade: bool = True) -> CancelAnswer:
        body = _drop_none({"reason": reason, "message": message, "cascade": cascade})
        response = await self._send(_Call("POST", f"/api/jobs/{job_id}/cancel", body=body))
        return CancelAnswer.model_validate(response.json())

    async def cancel_matching(self, *, status: str | None = None, parent_job_id: str | None = None,
                              tag: str | None = None, reason: str = "user_requested",
                              message: str | None = None) -> BulkCancelled:
        body = _drop_none({"status": status, "parent_job_id": parent_job_id, "tag": tag, "reason": reason,
                           "message": message})
        return BulkCancelled.model_validate((await self._send(_Call("POST", "/api/jobs/cancel", body=body))).json())

    async def results(self, job_id: str, *, page_size: int = 1000) -> PartialResults:
        pages, cursor = [], None
        while True:
            response = await self._send(_Call("GET", f"/api/jobs/{job_id}/partial-results",
                                              params=_drop_none({"limit": page_size, "cursor": cursor})))
            pages.append(PartialResults.model_validate(response.json()))
            cursor = _next_cursor(response)
            if cursor is None:
                return _joined(pages)

    async def resume(self, job_id: str, *, force: bool = False) -> Resumed:
        params = {"force": "true"} if force else None
        response = await self._send(_Call("POST", f"/api/jobs/{job_id}/resume", params=params))
        return Resumed.model_validate(response.json())

    async def pipelines(self) -> list[PipelineInfo]:
        return _PIPELINES.validate_python((await self._send(_Call("GET", "/api/pipelines"))).json())

    async def events(self, job_id: str) -> AsyncIterator[Event]:
        try:
            async with self._http.stream("GET", f"/api/jobs/{job_id}/events", timeout=_STREAM_TIMEOUT,
                                         headers={"Accept": "text/event-stream"}) as response:
                if not response.is_success:
                    await response.aread()
                    _check(response)
                parser = _SSE()
                async for line in response.aiter_lines():
                    event = parser.feed(line)
                    if event is not None:
                        yield event
                        if event.event == "end":
                            return
        except httpx.TransportError as exc:
            raise _unreachable(self.base_url, exc) from None

    async def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Until the job is terminal (its event stream's ``end``); TimeoutError after ``timeout``."""
        import asyncio

        async def until_end() -> Job:
            job = await self.get(job_id)
            while not job.is_terminal:
                try:
                    async for event in self.events(job_id):
                        if event.event == "end":
                            break
                except AndonAPIError as exc:
                    if exc.status is not None:
                        raise
                    await asyncio.sleep(0.2)  # the API restarting: try again
                job = await self.get(job_id)
            return job

        try:
            return await asyncio.wait_for(until_end(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"job {job_id} did not end within {timeout}s") from None
