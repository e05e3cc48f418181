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
from sqlalchemy import Select, and_, or_, select

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
    """Bounded passes over the rows that ended between ``window_s`` and ``grace_s`` ago.

    Each pass first looks at the rows that ended since this sweeper's previous pass, newest first
    (a run that just died is what a caller is waiting on), then spends what is left of its
    ``batch`` on a rescan cursor that walks the whole window oldest first and wraps (a run whose
    own write came back wrong after an outage longer than ``grace_s``). Only ids and states are
    read in bulk; a full row is loaded just for the few that need writing. So a pass costs the same
    however many jobs ended this hour, and a new job's state never waits behind the backlog."""

    grace_s: float
    window_s: float = 3600.0
    batch: int = 2000
    #: The rescan's position, ``(finished_at, id)`` of the last row it looked at; None once it wrapped.
    cursor: tuple[datetime, str] | None = None
    #: The end of the window at this sweeper's previous pass: rows past it are new to this sweeper.
    edge: datetime | None = None

    def run(self) -> list[str]:
        """One pass: the ids whose Celery state was written."""
        now = datetime.now(UTC)
        start, end = now - timedelta(seconds=self.window_s), now - timedelta(seconds=self.grace_s)
        seen = max(self.edge, start) if self.edge is not None else start
        with session_scope() as session:
            fresh = session.execute(self._rows(seen, end).order_by(Job.finished_at.desc(), Job.id.desc())
                                    .limit(self.batch)).all()
            room = self.batch - len(fresh)
            older = []
            if room > 0 and seen > start:
                query = self._rows(start, seen)
                if self.cursor is not None:
                    at, job_id = self.cursor
                    query = query.where(or_(Job.finished_at > at, and_(Job.finished_at == at, Job.id > job_id)))
                older = session.execute(query.order_by(Job.finished_at, Job.id).limit(room)).all()
                self.cursor = (older[-1].finished_at, older[-1].id) if len(older) == room else None
        self.edge = end
        return self._settle([*fresh, *older])

    @staticmethod
    def _rows(after: datetime, until: datetime) -> Select:
        return select(Job.id, Job.status, Job.finished_at).where(
            Job.finished_at > after, Job.finished_at <= until, Job.status.in_(TERMINAL))

    @staticmethod
    def _settle(rows: list) -> list[str]:
        if not rows:
            return []
        backend = app.backend
        raw = backend.client.mget([backend.get_key_for_task(row.id) for row in rows])
        wrong = [row.id for row, value in zip(rows, raw)
                 if needs_settling(row.status, backend.decode(value) if value else None)]
        if not wrong:
            return []
        beating = get_redis().mget([heartbeat_key(job_id) for job_id in wrong])
        idle = [job_id for job_id, beat in zip(wrong, beating) if beat is None]  # a live run writes its own end
        if not idle:
            return []
        with session_scope() as session:
            jobs = list(session.scalars(select(Job).where(Job.id.in_(idle))))
            for job in jobs:
                session.expunge(job)
        for job in jobs:
            settle_result(job)
        return [job.id for job in jobs]
