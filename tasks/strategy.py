"""Skipping the message of a job cancelled while queued in the worker's main process, before any pool
process is involved, with no database I/O.

Celery hands every message to its task's ``Strategy`` (celery/worker/strategy.py ``default``) in the
main process. Its own skip — ``Request.revoked()`` — only covers ids in ``worker_state.revoked``, a
``LimitedSet`` of 50,000 filled by revoke broadcasts; andon's cancels never go there, so each
cancelled message used to reach a pool process, which read the row and stored REVOKED (≈ 15 ms
each). This strategy wraps ``default``: a message whose job is in this process's
:class:`~tasks.cancellation.QueuedCancels` (pushed from Redis, reconciled) is answered at once as
``Request._announce_revoked`` would — a ``task-revoked`` event (Flower shows it revoked), the
message acked, REVOKED in the result backend (in batches, :class:`RevokedWriter`) — and its row is looked at later, in batches, only to end
one still ``pending`` (its request's row write had not landed). Any other message goes to
``default`` unchanged, and the pool process's own check (row terminal, token set) stays the safety
net: a job cancelled too long ago for the set, or while Redis was away, still never starts.

Messages that carry a chain, chord or callbacks are left to ``default`` too: ending those takes the
whole request (later steps, chord counters), which the pool process's path already does.

A skip on Redis then looks ahead (:mod:`tasks.lookahead`): the run of skippable messages at the head
of the queue is popped in one go and each is answered as above, without kombu's delivery and ack per
message (no ack at all: they never entered its unacked hash). A worker killed between that pop and
the REVOKED writes loses only what the sweeps redo, as that module says.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery import states
from celery.exceptions import TaskRevokedError
from celery.worker.strategy import default
from sqlalchemy import select

from db.models import Job
from db.session import get_engine
from db.vocabulary import CancellationReason, CancellationSource, JobStatus
from tasks.control import finalize_stopped
from tasks.lookahead import take_cancelled_run
from tasks.process import get_queued_cancels

__all__ = ["QueuedRows", "RevokedWriter", "skip_cancelled"]

log = logging.getLogger(__name__)


def skip_cancelled(task, app, consumer, **kwargs: Any):
    """The task's Strategy: Celery's ``default``, after a look at the queued cancels."""
    handle = default(task, app, consumer, **kwargs)
    cancelled = get_queued_cancels().start()
    rows = _queued_rows()
    revoked = _revoked_writer(task.backend) if not task.ignore_result else None
    connection_errors = consumer.connection_errors
    eventer = consumer.event_dispatcher
    send_events = bool(eventer and eventer.enabled and task.send_events)

    def skip(job_id: str) -> None:
        if send_events:
            eventer.send("task-revoked", uuid=job_id, terminated=False, signum=None, expired=False)
        if revoked is not None:
            revoked.add(job_id)
        rows.add(job_id)

    def skip_run(job_ids: list[str]) -> None:
        """Their events in one publish: Celery's dispatcher publishes its buffer of task events every
        ``buffer_limit`` (24) sends, else on the loop's next turn (``on_send_buffered``)."""
        if not send_events:
            for job_id in job_ids:
                skip(job_id)
            return
        limit = eventer.buffer_limit
        eventer.buffer_limit = limit + len(job_ids)
        try:
            for job_id in job_ids:
                skip(job_id)
        finally:
            eventer.buffer_limit = limit

    def skippable(message) -> str | None:
        """The job id of a message of this task that may be skipped, else None."""
        headers = message.headers or {}
        if "task" in headers:
            name, job_id = headers["task"], headers.get("id")
        else:
            payload = message.payload or {}
            name, job_id = payload.get("task"), payload.get("id")
        if name != task.name or job_id not in cancelled or _has_workflow(message, headers):
            return None
        return job_id

    def task_message_handler(message, body, ack, reject, callbacks, **more: Any):
        job_id = skippable(message)  # Celery hands this strategy only this task's messages
        if job_id is None:
            return handle(message, body, ack, reject, callbacks, **more)
        ack(log, connection_errors)
        skip(job_id)
        try:
            ahead = take_cancelled_run(message, skippable)
        except Exception:  # the queue is as it was, or the messages popped before the error are lost
            # with their jobs already cancelled: the sweeps redo what they need (tasks/lookahead.py)
            log.warning("andon: could not look ahead of a skipped message", exc_info=True)
            ahead = []
        if ahead:
            skip_run(ahead)
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


class RevokedWriter:
    """Stores REVOKED for skipped messages in batches, off the consumer's loop: one pipelined read and
    one pipelined write per batch (Celery's ``mark_as_revoked`` costs two round trips per id). As
    Celery's ``store_result`` does, a SUCCESS already stored is never overwritten. Its limit: a worker
    killed within the few milliseconds between the ack (or the look-ahead's pop) and the write leaves
    that Celery state PENDING until the result sweep writes it (tasks/results.py; the job row, already
    ``cancelled``, is unaffected)."""

    REASON = "cancelled while queued"

    def __init__(self, backend, every_s: float = 0.005, batch: int = 500) -> None:
        self.backend = backend
        self.every_s = every_s
        self.batch = batch
        self._ids: list[str] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        threading.Thread(target=self._run, name="andon-revoked-writer", daemon=True).start()

    def add(self, job_id: str) -> None:
        with self._lock:
            self._ids.append(job_id)
        self._wake.set()

    def flush(self) -> None:
        with self._lock:
            ids, self._ids = self._ids[:self.batch], self._ids[self.batch:]
        if not ids:
            return
        try:
            self._store(ids)
        except Exception:
            log.exception("andon: could not store REVOKED for %d skipped message(s); trying again", len(ids))
            with self._lock:
                self._ids[:0] = ids
            time.sleep(0.5)

    def _store(self, ids: list[str]) -> None:
        backend = self.backend
        client = getattr(backend, "client", None)
        if client is None or not hasattr(backend, "_get_result_meta"):  # not a Redis backend: one by one
            for job_id in ids:
                backend.mark_as_revoked(job_id, self.REASON)
            return
        result = backend.encode_result(TaskRevokedError(self.REASON), states.REVOKED)
        keys = [backend.get_key_for_task(job_id) for job_id in ids]
        current = client.mget(keys)
        with client.pipeline(transaction=False) as pipe:
            for job_id, key, raw in zip(ids, keys, current):
                if raw is not None and backend.decode_result(raw).get("status") == states.SUCCESS:
                    continue
                meta = backend._get_result_meta(result=result, state=states.REVOKED, traceback=None, request=None)
                meta["task_id"] = job_id
                value = backend.encode(meta)
                if backend.expires:
                    pipe.setex(key, backend.expires, value)
                else:
                    pipe.set(key, value)
                pipe.publish(key, value)
            pipe.execute()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            time.sleep(self.every_s)  # let a burst gather
            while self._ids:
                self.flush()


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


_helpers: dict[Any, Any] = {}
_helpers_lock = threading.Lock()


def _queued_rows() -> QueuedRows:
    with _helpers_lock:
        if "rows" not in _helpers:
            _helpers["rows"] = QueuedRows()
        return _helpers["rows"]


def _revoked_writer(backend) -> RevokedWriter:
    with _helpers_lock:
        if id(backend) not in _helpers:
            _helpers[id(backend)] = RevokedWriter(backend)
        return _helpers[id(backend)]
