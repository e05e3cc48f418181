"""Celery's result for a job that ended where nobody could write it: the row is the truth.

A job's run writes its own Celery state as it ends (:mod:`tasks.jobs`: SUCCESS, FAILURE, or REVOKED
with the reason). Some ends leave that state wrong for ever:

* the row was ended by someone else — the reaper or a finalizer for a run that died, a cancel of a
  queued job whose retried delivery is still waiting — so the result stays PENDING/STARTED/RETRY;
* the run's own write was cut by an outage, and Celery stored the outage instead: a FAILURE
  (``ConnectionError``, ``OperationalError``) once Redis, its result backend, was back, or
  ``Reject`` when the broker took no retry of the delivery;
* a late message of an ended job was discarded as revoked, over a result that was never stored.

:class:`ResultSweep` finds terminal rows whose Celery state is not the one the row implies and
writes it: REVOKED with the reason for ``cancelled``, SUCCESS for ``completed``, FAILURE with the
error for ``failed`` (DESIGN.md: the row is what a job's Celery state must say). It leaves alone a
row that ended less than ``grace_s`` ago (its run is still writing), one whose heartbeat a live run
still beats, a ``failed`` row's FAILURE (the job's own words), and a SUCCESS (Celery never
overwrites one: ``BaseKeyValueStoreBackend._store_result``). Writing a state derived from a terminal
row is idempotent: two workers sweeping at once write the same thing. It reads the result backend's
keys in bulk, so it needs Redis as the result backend — which andon always configures.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import states
from celery.exceptions import TaskRevokedError
from sqlalchemy import select

from db.models import Job
from db.session import session_scope
from db.vocabulary import JobStatus
from tasks.cancellation.keys import heartbeat_key
from tasks.celery_app import app
from tasks.process import get_redis

__all__ = ["ResultSweep", "expected_state", "needs_settling", "settle_result"]

log = logging.getLogger(__name__)

TERMINAL = (JobStatus.CANCELLED.value, JobStatus.COMPLETED.value, JobStatus.FAILED.value)


def expected_state(status: str) -> str:
    return {JobStatus.COMPLETED.value: states.SUCCESS, JobStatus.CANCELLED.value: states.REVOKED,
            JobStatus.FAILED.value: states.FAILURE}[status]


def settle_result(job: Job) -> None:
    """Write the Celery state ``job``'s terminal row implies (no errbacks, no events: only the state)."""
    backend = app.backend
    status = JobStatus(job.status)
    if status is JobStatus.COMPLETED:
        backend.store_result(job.id, {"job_id": job.id, "status": status.value}, states.SUCCESS)
    elif status is JobStatus.CANCELLED:
        why = f"{job.cancellation_reason} ({job.cancellation_source})"
        if job.cancellation_message:
            why += f": {job.cancellation_message}"
        backend.store_result(job.id, TaskRevokedError(why), states.REVOKED)
    else:
        backend.store_result(job.id, RuntimeError(job.error or "failed"), states.FAILURE)


def needs_settling(status: str, meta: dict[str, Any] | None) -> bool:
    """Does the stored Celery result (``meta``, None when there is none) disagree with a row in
    ``status`` in a way andon may correct?"""
    state = (meta or {}).get("status", states.PENDING)
    return state not in (expected_state(status), states.SUCCESS)


@dataclass
class ResultSweep:
    """Bounded passes over the rows that ended between ``window_s`` and ``grace_s`` ago, oldest
    first, ``batch`` rows a pass; the cursor (in memory, per worker) wraps round to the window's
    start, so every row in the window is looked at again until it ages out."""

    grace_s: float
    window_s: float = 3600.0
    batch: int = 200
    cursor: datetime | None = None

    def run(self) -> list[str]:
        """One pass: the ids whose Celery state was written."""
        now = datetime.now(UTC)
        start, end = now - timedelta(seconds=self.window_s), now - timedelta(seconds=self.grace_s)
        after = max(self.cursor, start) if self.cursor is not None else start
        with session_scope() as session:
            rows = list(session.scalars(
                select(Job).where(Job.finished_at > after, Job.finished_at <= end, Job.status.in_(TERMINAL))
                .order_by(Job.finished_at).limit(self.batch)))
            for row in rows:
                session.expunge(row)
        self.cursor = rows[-1].finished_at if len(rows) == self.batch else None
        if not rows:
            return []
        backend = app.backend
        raw = backend.client.mget([backend.get_key_for_task(row.id) for row in rows])
        wrong = [row for row, value in zip(rows, raw)
                 if needs_settling(row.status, backend.decode(value) if value else None)]
        if not wrong:
            return []
        beating = get_redis().mget([heartbeat_key(row.id) for row in wrong])
        settled = []
        for row, beat in zip(wrong, beating):
            if beat is not None:  # a live run still holds it: it writes its own state as it ends
                continue
            settle_result(row)
            settled.append(row.id)
        return settled
