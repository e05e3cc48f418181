"""Skipping the message of a job cancelled while queued in the worker's main process, before any pool
process is involved, with no database I/O.

Celery hands every message to its task's ``Strategy`` (celery/worker/strategy.py ``default``) in the
main process. Its own skip — ``Request.revoked()`` — only covers ids in ``worker_state.revoked``, a
``LimitedSet`` of 50,000 filled by revoke broadcasts; andon's cancels never go there, so each
cancelled message used to reach a pool process, which read the row and stored REVOKED (≈ 15 ms
each). This strategy wraps ``default``: a message whose job is in this process's
:class:`~tasks.cancellation.QueuedCancels` (pushed from Redis, reconciled) is answered at once as
``Request._announce_revoked`` would — a ``task-revoked`` event (Flower shows it revoked), REVOKED in
the result backend, the message acked — and its row is looked at later, in batches, only to end
one still ``pending`` (its request's row write had not landed). Any other message goes to
``default`` unchanged, and the pool process's own check (row terminal, token set) stays the safety
net: a job cancelled too long ago for the set, or while Redis was away, still never starts.

Messages that carry a chain, chord or callbacks are left to ``default`` too: ending those takes the
whole request (later steps, chord counters), which the pool process's path already does.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery.worker.strategy import default
from sqlalchemy import select

from db.models import Job
from db.session import get_engine
from db.vocabulary import CancellationReason, CancellationSource, JobStatus
from tasks.control import finalize_stopped
from tasks.process import get_queued_cancels

__all__ = ["QueuedRows", "skip_cancelled"]

log = logging.getLogger(__name__)


def skip_cancelled(task, app, consumer, **kwargs: Any):
    """The task's Strategy: Celery's ``default``, after a look at the queued cancels."""
    handle = default(task, app, consumer, **kwargs)
    cancelled = get_queued_cancels().start()
    rows = _queued_rows()
    connection_errors = consumer.connection_errors
    eventer = consumer.event_dispatcher
    send_events = bool(eventer and eventer.enabled and task.send_events)

    def task_message_handler(message, body, ack, reject, callbacks, **more: Any):
        headers = message.headers or {}
        job_id = headers.get("id") if "task" in headers else (message.payload or {}).get("id")
        if job_id not in cancelled or _has_workflow(message, headers):
            return handle(message, body, ack, reject, callbacks, **more)
        if send_events:
            eventer.send("task-revoked", uuid=job_id, terminated=False, signum=None, expired=False)
        task.backend.mark_as_revoked(job_id, "cancelled while queued", request=None,
                                     store_result=not task.ignore_result)
        ack(log, connection_errors)
        rows.add(job_id)
        return None

    return task_message_handler


def _has_workflow(message, headers: dict) -> bool:
    """A chain, chord or callbacks ride in the body (protocol 2) or the payload (protocol 1)."""
    if "task" in headers:
        payload = message.payload
        embed = payload[2] if isinstance(payload, (list, tuple)) and len(payload) > 2 else {}
    else:
        embed = message.payload or {}
    return bool(embed and any(embed.get(k) for k in ("chain", "chord", "callbacks", "errbacks")))


class QueuedRows:
    """The rows of skipped messages, looked at in batches after ``delay_s``: one ``SELECT`` for the
    many already terminal; a job still ``pending`` (its cancel's row write never landed — the request
    died after setting the token) is ended ``cancelled`` with its token's reason here."""

    def __init__(self, delay_s: float = 2.0) -> None:
        self.delay_s = delay_s
        self._due: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        threading.Thread(target=self._run, name="andon-queued-rows", daemon=True).start()

    def add(self, job_id: str) -> None:
        with self._lock:
            self._due.append((time.monotonic() + self.delay_s, job_id))
        self._wake.set()

    def settle_due(self) -> list[str]:
        """Look at the rows whose time has come; returns the ids this ended."""
        now = time.monotonic()
        with self._lock:
            due = [job_id for at, job_id in self._due if at <= now]
            self._due = [(at, job_id) for at, job_id in self._due if at > now]
        ended = []
        try:
            for start in range(0, len(due), 1000):
                chunk = due[start:start + 1000]
                with get_engine().connect() as conn:
                    pending = list(conn.scalars(select(Job.id).where(
                        Job.id.in_(chunk), Job.status == JobStatus.PENDING.value)))
                for job_id in pending:
                    if finalize_stopped(job_id, CancellationReason.USER_REQUESTED, CancellationSource.API,
                                        "cancelled while queued"):
                        ended.append(job_id)
        except Exception:
            log.exception("andon: could not look at the rows of skipped messages; trying again")
            with self._lock:
                self._due.extend((now + self.delay_s, job_id) for job_id in due)
        return ended

    def _run(self) -> None:
        while True:
            self._wake.wait(self.delay_s)
            self._wake.clear()
            time.sleep(self.delay_s / 4)
            if self._due:
                self.settle_due()


_rows: list[QueuedRows] = []
_rows_lock = threading.Lock()


def _queued_rows() -> QueuedRows:
    with _rows_lock:
        if not _rows:
            _rows.append(QueuedRows())
        return _rows[0]
