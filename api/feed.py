"""Every job event a tenant may see, as one stream: ``GET /api/events`` (the dashboard's live feed).

The same machinery as one job's stream (:mod:`api.progress`): the database is the source, read in
order since the last read; :data:`api.progress.changes` wakes the stream when any job changed (one
Redis subscriber per API process), a slow safety poll covers a lost notification, and the reads run
on the shared reader threads. A wake-up that only says "a heartbeat" costs no query: the stream reads
the positions (item, stage) of the jobs that beat, from Redis, in one round trip.

The stream starts *now*: it sends what happens after it opened (first an ``open`` event), not the
history — a client lists the jobs (``GET /api/jobs``) once the stream is open. Each event names its
job (``job_id``) and carries the job's status and counts as of the read (``job_status``,
``completed_items``, ``failed_items``, ``total_items``), so a table can update a row without asking.

What it can't do: see a row committed out of id order (two PostgreSQL transactions inserting at the
same instant, the lower id committing last) — such a row is skipped, and the job's next event
brings its status and counts up to date again; or replay what happened while no stream was open
(there is no ``Last-Event-ID``: a client that reconnects lists the jobs again).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sse_starlette import EventSourceResponse

from api.progress import _as_sse, _EventStream, _in_reader, changes
from db.models import Job, JobEvent, JobItem
from db.session import session_scope
from db.settings import get_settings
from db.vocabulary import TERMINAL_STATUSES, EventKind, JobStatus

#: Rows read from each table per query; a busy moment (a bulk cancel of 10,000) is read in batches.
BATCH = 500
#: At most this many unfinished jobs are followed for their heartbeats (progress events).
LIVE_CAP = 10_000
#: After a wake-up, wait this long so a burst of changes is one read, not one read per change.
GATHER_S = 0.1

_TERMINAL = [s.value for s in TERMINAL_STATUSES]
_ARRIVALS = {EventKind.SUBMITTED.value, EventKind.STARTED.value, EventKind.RESUMED.value, EventKind.REQUEUED.value}


@dataclass
class TenantCursor:
    """Where one stream has got to in every job's events and item rows, for one tenant (None: all)."""

    tenant: str | None
    last_event: int = 0
    last_item: int = 0
    #: Unfinished jobs of this tenant: the ones whose heartbeats the stream reads.
    live: set[str] = field(default_factory=set)

    def _visible(self, query):
        return query if self.tenant is None else query.where(Job.tenant == self.tenant)

    def start(self) -> None:
        """Begin at the newest rows; note which of the tenant's jobs are unfinished (blocking)."""
        with session_scope() as session:
            self.last_event = session.scalar(select(func.max(JobEvent.id))) or 0
            self.last_item = session.scalar(select(func.max(JobItem.id))) or 0
            unfinished = self._visible(select(Job.id).where(Job.status.not_in(_TERMINAL))).limit(LIVE_CAP)
            self.live = set(session.scalars(unfinished))

    def read(self) -> tuple[list[tuple[str, dict]], bool]:
        """``(events, more)``: what happened since the last read, in order; ``more`` when a batch was
        full and another read should follow at once (blocking; runs on a reader thread)."""
        job = (Job.status, Job.completed_items, Job.failed_items, Job.total_items)
        with session_scope() as session:
            events = session.execute(self._visible(
                select(JobEvent, *job).join(Job, Job.id == JobEvent.job_id).where(JobEvent.id > self.last_event))
                .order_by(JobEvent.id).limit(BATCH)).all()
            items = session.execute(self._visible(
                select(JobItem, *job).join(Job, Job.id == JobItem.job_id).where(JobItem.id > self.last_item))
                .order_by(JobItem.id).limit(BATCH)).all()
            happened = []
            for row, status, completed, failed, total in events:
                self.last_event = max(self.last_event, row.id)
                happened.append((row.at, row.kind, {
                    "job_id": row.job_id, "reason": row.reason, "source": row.source, "actor": row.actor,
                    "detail": row.detail, "at": row.at.isoformat(), "job_status": status,
                    "completed_items": completed, "failed_items": failed, "total_items": total}))
            for row, status, completed, failed, total in items:
                self.last_item = max(self.last_item, row.id)
                happened.append((row.finished_at, "item", {
                    "job_id": row.job_id, "index": row.index, "status": row.status, "stage": row.stage,
                    "error": row.error, "job_status": status, "completed_items": completed,
                    "failed_items": failed, "total_items": total}))
        out = []
        for _, kind, data in sorted(happened, key=lambda h: h[0]):
            if JobStatus(data["job_status"]).is_terminal:
                self.live.discard(data["job_id"])
            elif kind in _ARRIVALS and len(self.live) < LIVE_CAP:
                self.live.add(data["job_id"])
            out.append((kind, data))
        return out, len(events) == BATCH or len(items) == BATCH


async def follow_every(cursor: TenantCursor, poll_s: float | None = None,
                       max_s: float = 24 * 3600) -> AsyncIterator[tuple[str, dict]]:
    """``(event, data)``: ``open``, then every event of the cursor's jobs as it happens, and a
    ``progress`` event (``job_id``, ``item``, ``stage``) when a running job's position moves."""
    poll_s = poll_s or get_settings().stream_poll_s
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max_s
    watch = changes.listen_every()
    positions: dict[str, dict[str, Any]] = {}
    try:
        yield "open", {"tenant": cursor.tenant}
        while True:
            rows, beats = watch.take()
            more = rows
            while more:
                happened, more = await _in_reader(cursor.read)
                for item in happened:
                    yield item
            moved = await changes.positions(sorted(beats & cursor.live))
            for job_id, position in moved.items():
                if positions.get(job_id) != position:
                    positions[job_id] = position
                    yield "progress", {"job_id": job_id, **position}
            if len(positions) > len(cursor.live):
                positions = {j: p for j, p in positions.items() if j in cursor.live}
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(watch.wake.wait(), min(poll_s, remaining))
            except TimeoutError:
                watch.rows = True  # the safety poll: read even though nobody said so
            await asyncio.sleep(GATHER_S)
    finally:
        changes.forget_every(watch)


async def open_every(tenant: str | None, release: Callable[[], None]) -> EventSourceResponse:
    """The response for ``GET /api/events``. ``release`` gives the caller's stream slot back, once,
    however the stream ends."""
    cursor = TenantCursor(tenant)
    try:
        await _in_reader(cursor.start)
    except BaseException:
        release()
        raise
    return _EventStream(_as_sse(follow_every(cursor)), release, sep="\n",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
