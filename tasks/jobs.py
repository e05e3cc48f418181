"""The Celery task: thin. It takes a job id, the pipeline does the rest.

Registered by a stable name so other services can enqueue without importing andon::

    app.send_task("andon.analyze_documents", kwargs={"documents": ["...", "..."]})

(the job row is then created from the task id), or, for a job made through the API,
``send_task("andon.analyze_documents", args=[job_id], task_id=job_id)``.

How a job ends in Celery's terms: completed → SUCCESS; failed → FAILURE; cancelled → REVOKED in the
result backend *and* a ``task-revoked`` event, so Flower shows REVOKED with the reason instead of
the SUCCESS plain Celery would report for a revoked task that returned.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Task, states
from celery.exceptions import Ignore, TaskRevokedError

from db import jobs as job_rows
from db.models import Job
from db.session import session_scope
from db.vocabulary import CancellationReason, CancellationSource, JobStatus
from tasks.app import app
from tasks.control import request_cancel, settle_children
from tasks.errors import AndonError
from tasks.pipeline import JobOutcome, run_job

TASK_NAME = "andon.analyze_documents"


class JobFailed(AndonError):
    """The job ended ``failed``; raised so Celery records FAILURE (and fails the rest of a chain)."""


class PipelineTask(Task):
    #: Main-process hooks for the ways a job's process can die under it (time limit, lost worker).
    Request = "tasks.request:JobRequest"


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


@app.task(name=TASK_NAME, bind=True, base=PipelineTask)
def analyze_documents(
    self, job_id: str | None = None, documents: list[str] | None = None, options: dict[str, Any] | None = None
) -> dict[str, Any]:
    job_id = job_id or self.request.id
    if documents is not None:
        with session_scope() as session:
            if session.get(Job, job_id) is None:
                job_rows.create_job(session, job_id, documents, options or {}, actor="send_task")
    with soft_time_limit_as_cancel(job_id):
        try:
            outcome = run_job(job_id)
        finally:
            settle_children(job_id)  # enqueue waiting children, or cancel them if this didn't complete
    if outcome.status is JobStatus.CANCELLED:
        _end_as_revoked(self, outcome)
    if outcome.status is JobStatus.FAILED:
        raise JobFailed(outcome.error or f"job {job_id} failed")
    return outcome.as_dict()


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
