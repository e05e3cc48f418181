"""A job's progress as a stream of events, for ``GET /api/jobs/{id}/events`` and ``andon watch``.

The database is the source: job events and item rows, read in order since the last read, plus the
position (item, stage) the job's heartbeat publishes. A stream holds no thread while it waits: it
sleeps on an asyncio event until :mod:`tasks.notify` says its job changed (one Redis subscriber per
API process fans those out, :class:`JobChanges`), then re-reads — however many notifications came
in meanwhile, one read. A slow safety poll (``ANDON_STREAM_POLL_S``) covers a lost message or Redis
being away, so a stream is late at worst, never wrong. The reads themselves are short blocking
queries, run on a small pool of reader threads shared by every stream, never on the event loop.
The stream ends once the job is terminal and everything before that has been sent.

What it can't do: interrupt a read already running when the client goes away (it finishes on its
reader thread and is dropped), or count streams across API processes (the cap is per process).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis.asyncio as aioredis
from sqlalchemy import select
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import Receive, Scope, Send

from db.models import Job, JobEvent, JobItem
from db.session import session_scope
from db.settings import get_settings
from db.vocabulary import JobStatus
from tasks.cancellation.keys import heartbeat_key
from tasks.errors import JobNotFound
from tasks.notify import channel_for

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Every stream's database reads run here: a handful of threads, however many streams are open.
_readers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="andon-stream-read")


async def _in_reader(fn: Callable[[], T]) -> T:
    return await asyncio.get_running_loop().run_in_executor(_readers, fn)


# ---------------------------------------------------------------------------------------------
# What happened since the last read (blocking; runs on a reader thread)


@dataclass
class JobCursor:
    """Where one stream has got to in one job's events and item rows."""

    job_id: str
    tenant: str | None = None
    last_event: int = 0
    last_item: int = 0
    counts: dict[str, Any] = field(default_factory=dict)

    def read(self) -> tuple[list[tuple[str, dict]], bool]:
        """``(events, ended)``: what happened since the last read, in order, ending with ``end`` at
        a terminal state. Raises JobNotFound for a job that doesn't exist or isn't the tenant's."""
        with session_scope() as session:
            job = session.get(Job, self.job_id)
            if job is None or (self.tenant is not None and job.tenant != self.tenant):
                raise JobNotFound(self.job_id)
            events = session.scalars(select(JobEvent).where(JobEvent.job_id == self.job_id,
                                                            JobEvent.id > self.last_event)
                                     .order_by(JobEvent.id)).all()
            item_rows = session.scalars(select(JobItem).where(JobItem.job_id == self.job_id,
                                                              JobItem.id > self.last_item)
                                        .order_by(JobItem.id)).all()
        self.counts = {"completed_items": job.completed_items, "failed_items": job.failed_items,
                       "total_items": job.total_items}
        out: list[tuple[str, dict]] = []
        happened = [(e.at, "event", e) for e in events] + [(i.finished_at, "item", i) for i in item_rows]
        for _, kind, row in sorted(happened, key=lambda h: h[0]):
            if kind == "item":
                self.last_item = max(self.last_item, row.id)
                out.append(("item", {"index": row.index, "status": row.status, "stage": row.stage,
                                     "error": row.error, **self.counts}))
            else:
                self.last_event = max(self.last_event, row.id)
                out.append((row.kind, {"reason": row.reason, "source": row.source, "actor": row.actor,
                                       "detail": row.detail, "at": row.at.isoformat()}))
        if JobStatus(job.status).is_terminal:
            out.append(("end", {"status": job.status, "reason": job.cancellation_reason,
                                "source": job.cancellation_source, "message": job.cancellation_message,
                                **self.counts, "error": job.error}))
            return out, True
        return out, False


# ---------------------------------------------------------------------------------------------
# Who is woken when (the event loop)


class JobChanges:
    """One Redis subscriber per API process, fanning job-change notifications out to open streams.

    Each open stream registers an :class:`asyncio.Event` for its job; a notification sets the events
    of that job (several notifications before the stream wakes are one wake-up). On every
    (re)connect every stream is woken once, for whatever was published while nobody listened.
    """

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._every: set[EveryJob] = set()
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.client: aioredis.Redis | None = None
        self.connected = False

    def listen(self, job_id: str) -> asyncio.Event:
        self._ensure_running()
        wake = asyncio.Event()
        self._waiters.setdefault(job_id, set()).add(wake)
        return wake

    def forget(self, job_id: str, wake: asyncio.Event) -> None:
        waiters = self._waiters.get(job_id)
        if waiters is not None:
            waiters.discard(wake)
            if not waiters:
                del self._waiters[job_id]

    def listen_every(self) -> EveryJob:
        """A wake-up for a change to any job (``GET /api/events``), saying which jobs beat."""
        self._ensure_running()
        watch = EveryJob()
        self._every.add(watch)
        return watch

    def forget_every(self, watch: EveryJob) -> None:
        self._every.discard(watch)

    def _wake(self, job_id: str | None = None, kind: str | None = None) -> None:
        groups = self._waiters.values() if job_id is None else [self._waiters.get(job_id, ())]
        for waiters in groups:
            for wake in waiters:
                wake.set()
        for watch in self._every:
            watch.touch(job_id, kind)

    def _ensure_running(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is not None and not self._task.done() and self._loop is loop:
            return
        self._loop = loop
        self.client = aioredis.Redis.from_url(get_settings().resolved_redis_url, socket_connect_timeout=2)
        self._task = loop.create_task(self._run(self.client), name="andon-job-changes")

    async def _run(self, client: aioredis.Redis) -> None:
        backoff = 0.1
        while True:
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(channel_for(client))
                self.connected, backoff = True, 0.1
                self._wake()  # whatever was published while nobody listened
                async for message in pubsub.listen():
                    try:
                        change = json.loads(message["data"])
                        self._wake(change["job_id"], change.get("kind"))
                    except (ValueError, KeyError, TypeError):
                        log.warning("ignoring a malformed job-change notification: %r", message.get("data"))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: streams fall back to their safety poll
                if self.connected:
                    log.warning("job-change subscriber lost Redis (%s); streams poll until it is back", exc)
                self.connected = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                self.connected = False
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def close(self) -> None:
        task, client, self._task, self.client = self._task, self.client, None, None
        if task is not None and not task.done() and self._loop is asyncio.get_running_loop():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()

    async def position(self, job_id: str) -> dict[str, Any] | None:
        """(item, stage) from the job's heartbeat; None when Redis is away or the job isn't beating."""
        if not self.connected or self.client is None:
            return None
        try:
            raw = await asyncio.wait_for(self.client.get(heartbeat_key(job_id)), 1.0)
            beat = json.loads(raw) if raw else {}
        except Exception:
            return None  # progress goes on without the stage
        return {"item": beat.get("item"), "stage": beat.get("stage")} if beat.get("stage") else None

    async def positions(self, job_ids: list[str]) -> dict[str, dict[str, Any]]:
        """:meth:`position` of several jobs in one round trip; jobs not beating are left out."""
        if not job_ids or not self.connected or self.client is None:
            return {}
        try:
            raws = await asyncio.wait_for(self.client.mget([heartbeat_key(j) for j in job_ids]), 1.0)
        except Exception:
            return {}
        out = {}
        for job_id, raw in zip(job_ids, raws):
            try:
                beat = json.loads(raw) if raw else {}
            except ValueError:
                continue
            if beat.get("stage"):
                out[job_id] = {"item": beat.get("item"), "stage": beat.get("stage")}
        return out


class EveryJob:
    """One ``GET /api/events`` stream's wake-up: set on any job's change. Remembers whether rows may
    have changed (events, items: re-read the database) or only heartbeats (re-read those jobs'
    positions, no query)."""

    def __init__(self) -> None:
        self.wake = asyncio.Event()
        self.rows = True  # read once at the start
        self.beats: set[str] = set()

    def touch(self, job_id: str | None, kind: str | None) -> None:
        if kind == "heartbeat" and job_id is not None:
            self.beats.add(job_id)
        else:
            self.rows = True  # a row, or a (re)connect after which anything may have happened
        self.wake.set()

    def take(self) -> tuple[bool, set[str]]:
        rows, beats, self.rows, self.beats = self.rows, self.beats, False, set()
        self.wake.clear()
        return rows, beats


changes = JobChanges()


# ---------------------------------------------------------------------------------------------
# How many streams each tenant (or client) has open


class StreamSlots:
    """Open streams per key (tenant, or client address), capped; used from the event loop only."""

    def __init__(self) -> None:
        self.open: Counter[str] = Counter()

    def take(self, key: str, limit: int) -> Callable[[], None] | None:
        """A release function for a new stream's slot, or None when ``key`` has ``limit`` open."""
        if self.open[key] >= limit:
            return None
        self.open[key] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.open[key] -= 1
                if self.open[key] <= 0:
                    del self.open[key]

        return release


slots = StreamSlots()


# ---------------------------------------------------------------------------------------------
# The stream


async def follow(cursor: JobCursor, happened: list[tuple[str, dict]], ended: bool, poll_s: float | None = None,
                 max_s: float = 24 * 3600) -> AsyncIterator[tuple[str, dict]]:
    """``(event, data)`` in the order things happened, ending with ``end`` at a terminal state:
    first ``happened`` (the cursor's first read), then whatever each wake-up or poll finds."""
    poll_s = poll_s or get_settings().stream_poll_s
    wake = changes.listen(cursor.job_id)
    wake.set()  # re-read once at once: a change between the first read and listen() woke nobody
    last_position = None
    deadline = asyncio.get_running_loop().time() + max_s
    try:
        while True:
            for item in happened:
                yield item
            if ended:
                return
            position = await changes.position(cursor.job_id)
            if position and position != last_position:
                last_position = position
                yield "progress", {**position, **cursor.counts}
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), min(poll_s, remaining))
            wake.clear()
            happened, ended = await _in_reader(cursor.read)
    finally:
        changes.forget(cursor.job_id, wake)


class _EventStream(EventSourceResponse):
    """An SSE response that gives its stream slot back however it ends (done, client gone, error)."""

    def __init__(self, content: AsyncIterator[ServerSentEvent], release: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


async def _as_sse(events: AsyncIterator[tuple[str, dict]]) -> AsyncIterator[ServerSentEvent]:
    number = 0
    try:
        async for event, data in events:
            number += 1
            yield ServerSentEvent(data=json.dumps(data), event=event, id=str(number))
    finally:
        await events.aclose()


async def open_events(job_id: str, tenant: str | None, release: Callable[[], None]) -> EventSourceResponse:
    """The response for ``GET /api/jobs/{id}/events``: the first read happens here, so an unknown
    job is JobNotFound (404) before any byte is sent. ``release`` gives the caller's stream slot
    back, once, however the stream ends."""
    cursor = JobCursor(job_id, tenant)
    try:
        happened, ended = await _in_reader(cursor.read)
    except BaseException:
        release()
        raise
    return _EventStream(_as_sse(follow(cursor, happened, ended)), release, sep="\n",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
