"""The Celery tasks: thin. They take a job id (or make the job from a message), the runner does the rest.

Registered by stable names (:mod:`tasks.celery_app`) so other services can enqueue without importing
andon::

    app.send_task("andon.run_pipeline", kwargs={"pipeline": "summarize", "items": [...]})
    app.send_task("andon.analyze_documents", kwargs={"documents": ["...", "..."]})

(the job row is then made from the task id, which must look like an id), or, for a job made through
the API, ``send_task("andon.run_pipeline", args=[job_id], task_id=job_id)``.

How a job ends in Celery's terms: completed → SUCCESS; failed → FAILURE; cancelled → REVOKED in the
result backend *and* a ``task-revoked`` event, so Flower shows REVOKED with the reason instead of
the SUCCESS plain Celery would report for a revoked task that returned.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Task, states
from celery.exceptions import Ignore, MaxRetriesExceededError, Reject, TaskRevokedError
from redis.exceptions import RedisError
from sqlalchemy.exc import InterfaceError, OperationalError

from db import jobs as job_rows
from db.models import Job
from db.session import is_transient, session_scope
from db.settings import get_settings
from db.vocabulary import CancellationReason, CancellationSource, EventKind, JobStatus
from tasks import lifecycle
from tasks.cancellation import CancellationError
from tasks.control import request_cancel, settle_children
from tasks.errors import AndonError, InvalidJobId, UnknownPipeline
from tasks.intake import check_submission
from tasks.lifecycle import JobOutcome
from tasks.paths import check_job_id
from tasks.runner import DuplicateDelivery, run_job

__all__ = ["JobFailed", "PipelineTask", "analyze_documents", "run_pipeline"]

log = logging.getLogger(__name__)


class JobFailed(AndonError):
    """The job ended ``failed``; raised so Celery records FAILURE (and fails the rest of a chain)."""


class PipelineTask(Task):
    #: Main-process hooks for the ways a job's process can die under it (time limit, lost worker).
    Request = "tasks.request:JobRequest"
    #: The main process skips the messages of jobs cancelled while queued, without a pool process.
    Strategy = "tasks.strategy:skip_cancelled"


@contextmanager
def soft_time_limit_as_cancel(job_id: str) -> Iterator[None]:
    """Turn Celery's soft time limit into a token cancel (``timeout``, source ``time_limit``).

    billiard would raise ``SoftTimeLimitExceeded`` wherever the job happens to be — possibly in the
    middle of committing an item. A cancel instead stops the job at its next checkpoint. The handler
    only starts a thread: taking locks or doing I/O inside a signal handler could deadlock.
    """

    def cancel() -> None:
        try:
            request_cancel(job_id, CancellationReason.TIMEOUT, "Celery soft time limit exceeded",
                           CancellationSource.TIME_LIMIT, actor="worker")
        except AndonError:
            pass

    try:
        previous = signal.signal(signal.SIGUSR1, lambda *_: threading.Thread(target=cancel, daemon=True).start())
    except ValueError:  # not the main thread (threads/solo pools): keep Celery's behaviour
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGUSR1, previous)


def run_pipeline(self: Task, job_id: str | None = None, pipeline: str | None = None, items: list[Any] | None = None,
                 options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one job. With ``items``, the job row is made first from this message (``send_task``)."""
    try:
        job_id = check_job_id(job_id or self.request.id)
    except InvalidJobId as exc:
        log.error("andon: refused a job message: %s", exc)
        raise Reject(str(exc), requeue=False) from None
    try:
        if items is not None:
            _adopt(job_id, pipeline or "documents", items, options)
        with soft_time_limit_as_cancel(job_id):
            outcome = None
            try:
                outcome = run_job(job_id)
            finally:  # enqueue waiting children, or cancel them if this didn't complete
                settle_children(job_id, outcome.status if outcome is not None else None)
    except UnknownPipeline as exc:
        _send_back(self, job_id, exc)
    except DuplicateDelivery:
        _skip_duplicate(job_id)
    except (RedisError, OperationalError, InterfaceError) as exc:
        if isinstance(exc, (OperationalError, InterfaceError)) and not is_transient(exc):
            raise
        # Redis away (nobody can tell whether the job's owner lives) or the database away before
        # the job started: nothing was done; try this delivery again later (for an hour), never fail it
        log.warning("andon: job %s delivery deferred: %s", job_id, str(exc).splitlines()[0][:200])
        raise self.retry(countdown=5, max_retries=720, exc=exc) from None
    except CancellationError:  # a BaseException: Celery's tracer would re-raise it without a state
        outcome = lifecycle.outcome_of(job_id, ran=True)
    if outcome.status is JobStatus.CANCELLED:
        _end_as_revoked(self, outcome)
    if outcome.status is JobStatus.FAILED:
        raise JobFailed(outcome.error or f"job {job_id} failed")
    return outcome.as_dict()


def analyze_documents(self: Task, job_id: str | None = None, documents: list[str] | None = None,
                      options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The first door, kept: the built-in ``documents`` pipeline over ``documents``."""
    return run_pipeline(self, job_id, "documents", documents, options)


def _adopt(job_id: str, pipeline: str, items: Any, options: Any) -> None:
    """Make the row for a job sent as a message (``send_task`` with items), unless it exists."""
    with session_scope() as session:
        if session.get(Job, job_id) is not None:
            return
    submission = check_submission(pipeline, items, options)  # AndonError → FAILURE with the reason
    with session_scope() as session:
        job_rows.create_job(session, job_id, submission.items, submission.options,
                            pipeline=submission.pipeline.name, actor="send_task")


def _skip_duplicate(job_id: str) -> None:
    """A second delivery of a job whose owner is alive (Flower apply, ``send_task`` with the same id,
    a redelivery after the visibility timeout): record it, store no state, ack the message."""
    try:
        with session_scope() as session:
            job_rows.add_event(session, job_id, EventKind.DUPLICATE_SKIPPED, detail={"pid": os.getpid()})
    except Exception:
        log.exception("andon: could not record a duplicate delivery of %s", job_id)
    raise Ignore()


def _send_back(task: Task, job_id: str, error: UnknownPipeline) -> None:
    """This worker doesn't know the job's pipeline (a rolling deploy, a queue served by mixed
    workers): send the message back for one that does, with backoff; after the last try, fail the
    job with the reason. Never drop it silently."""
    retries = task.request.retries or 0
    try:
        raise task.retry(countdown=min(2 ** retries, 30), max_retries=get_settings().unknown_pipeline_retries,
                         exc=error)
    except MaxRetriesExceededError:
        message = f"no worker knows this job's pipeline: {error}"
        if lifecycle.end_failed(job_id, message):
            settle_children(job_id)
        raise JobFailed(message) from None


def _end_as_revoked(task: Task, outcome: JobOutcome) -> None:
    """Store REVOKED (later chain steps too) and tell Flower, then end without a SUCCESS."""
    with session_scope() as session:
        job = session.get(Job, outcome.job_id)
        why = f"{job.cancellation_reason} ({job.cancellation_source})"
        if job.cancellation_message:
            why += f": {job.cancellation_message}"
    task.backend.mark_as_failure(task.request.id, TaskRevokedError(why), request=task.request,
                                 state=states.REVOKED, call_errbacks=False)
    task.send_event("task-revoked", terminated=False, signum=None, expired=False,
                    exception=f"TaskRevokedError({why!r})")
    raise Ignore()
