"""A job's progress as a stream of events, for ``GET /api/jobs/{id}/events`` and ``andon watch``.

The database is the source: job events and item rows, read in order since the last poll, plus the
position (item, stage) the job's heartbeat publishes. Polling a few times a second costs two small
indexed queries and survives any restart of Redis, the worker or this process; the stream ends
once the job is terminal and everything before that has been sent.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from sqlalchemy import select

from db.models import Job, JobEvent, JobItem
from db.session import session_scope
from db.vocabulary import JobStatus
from tasks.cancellation.keys import heartbeat_key
from tasks.errors import JobNotFound
from tasks.process import get_redis


def _position(job_id: str) -> dict[str, Any] | None:
    try:
        raw = get_redis().get(heartbeat_key(job_id))
    except Exception:
        return None  # Redis away: progress goes on without the stage
    if not raw:
        return None
    try:
        beat = json.loads(raw)
    except ValueError:
        return None
    return {"item": beat.get("item"), "stage": beat.get("stage")} if beat.get("stage") else None


def job_progress(job_id: str, poll_s: float = 0.2, max_s: float = 24 * 3600) -> Iterator[tuple[str, dict]]:
    """Yield ``(event, data)`` in the order things happened, ending with ``end`` at a terminal state."""
    with session_scope() as session:
        if session.get(Job, job_id) is None:
            raise JobNotFound(job_id)
    last_event = last_item = 0
    last_position = None
    started = time.monotonic()
    while time.monotonic() - started < max_s:
        with session_scope() as session:
            job = session.get(Job, job_id)
            events = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > last_event)
                                     .order_by(JobEvent.id)).all()
            item_rows = session.scalars(select(JobItem).where(JobItem.job_id == job_id, JobItem.id > last_item)
                                        .order_by(JobItem.id)).all()
        happened = [(e.at, "event", e) for e in events] + [(i.finished_at, "item", i) for i in item_rows]
        for _, kind, row in sorted(happened, key=lambda h: h[0]):
            if kind == "item":
                last_item = max(last_item, row.id)
                yield "item", {"index": row.index, "status": row.status, "stage": row.stage, "error": row.error,
                               "completed_items": job.completed_items, "failed_items": job.failed_items,
                               "total_items": job.total_items}
            else:
                last_event = max(last_event, row.id)
                yield row.kind, {"reason": row.reason, "source": row.source, "actor": row.actor,
                                 "detail": row.detail, "at": row.at.isoformat()}
        if JobStatus(job.status).is_terminal:
            yield "end", {"status": job.status, "reason": job.cancellation_reason,
                          "source": job.cancellation_source, "message": job.cancellation_message,
                          "completed_items": job.completed_items, "failed_items": job.failed_items,
                          "total_items": job.total_items, "error": job.error}
            return
        position = _position(job_id)
        if position and position != last_position:
            last_position = position
            yield "progress", {**position, "completed_items": job.completed_items,
                               "failed_items": job.failed_items, "total_items": job.total_items}
        time.sleep(poll_s)


def as_sse(events: Iterator[tuple[str, dict]]) -> Iterator[str]:
    for number, (event, data) in enumerate(events, 1):
        yield f"id: {number}\nevent: {event}\ndata: {json.dumps(data)}\n\n"
