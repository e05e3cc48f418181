"""Running one job in a worker: the same for every pipeline, built-in or a user's.

The Celery task hands a job id to :func:`run_job`. A :class:`JobRun` owns everything the job starts —
its token watch, heartbeat and escalation ladder, deadline timer and scratch dir — in one
``ExitStack``, so the exit path is single: whatever stops the job, in-flight items are recorded,
the job's resources are released *before* its terminal row is committed (whoever sees a job ended
sees it tidy), and its machinery stops only *after* (so the reaper never mistakes a finishing job
for a lost one). Each finished item is committed at once: a later cancel, crash or kill loses
nothing already done.
"""

from __future__ import annotations

import logging
import threading
from contextlib import ExitStack
from datetime import UTC, datetime

from db import jobs as job_rows
from db.models import Job
from db.session import session_scope, transaction
from db.settings import get_settings
from db.vocabulary import CancellationReason, CancellationSource, EventKind, ItemStatus, JobStatus
from tasks import lifecycle, registry
from tasks.cancellation import CancellationError, CancellationToken, ForcedCancellation, cancellation_in
from tasks.cleanup import CleanupManager
from tasks.context import JobContext
from tasks.control import request_cancel
from tasks.engine import ItemRecord, ItemRun
from tasks.errors import AndonError, JobNotFound
from tasks.lifecycle import JobOutcome
from tasks.monitor import JobMonitor, Ladder
from tasks.paths import check_job_id, job_scratch_dir
from tasks.pipeline import Pipeline
from tasks.process import get_watcher

__all__ = ["JobRun", "run_job"]

log = logging.getLogger(__name__)

#: Job options that are andon's own (limits and the ladder), not the pipeline's.
ANDON_OPTIONS = ("time_limit_s", "soft_time_limit_s", "max_rss_mb", "escalate_after_s", "kill_after_s")


def run_job(job_id: str) -> JobOutcome:
    """Run a job to exactly one terminal state, keeping every finished item, cleaning up always.

    Raises :class:`~tasks.errors.UnknownPipeline` *before* touching the row when this worker doesn't
    know the job's pipeline (the task sends the job back for a worker that does). If the process is
    torn down under the job (``SystemExit`` from Celery's terminate, hard time limit or cold
    shutdown) and no cancel was requested, the row is left for the worker's main process to finalize:
    only it knows which of those it was.
    """
    check_job_id(job_id)
    with session_scope() as session:
        row = session.get(Job, job_id)
        if row is None:
            raise JobNotFound(job_id)
        if JobStatus(row.status).is_terminal:
            return lifecycle.outcome_of(job_id, ran=False)
        pipeline = registry.get(row.pipeline)
    watcher = get_watcher()
    token = watcher.watch(job_id)
    try:
        job = lifecycle.start(job_id)
    except BaseException:
        watcher.unwatch(job_id)
        raise
    if job is None:
        watcher.unwatch(job_id)
        return lifecycle.outcome_of(job_id, ran=False)
    return JobRun(job, pipeline, token).execute(watcher)


class JobRun:
    """One run of one job in this process."""

    def __init__(self, job: Job, pipeline: Pipeline, token: CancellationToken) -> None:
        self.job = job
        self.pipeline = pipeline
        self.token = token
        self.cleanup = CleanupManager()  # what the job acquired: released before its terminal row
        self.finished: set[int] = set()
        self.reached: tuple[int, str] | None = None

    def execute(self, watcher) -> JobOutcome:
        job, token, settings = self.job, self.token, get_settings()
        with ExitStack() as machinery:  # unwinds after the terminal row is committed
            machinery.callback(watcher.unwatch, job.id)
            options = job.options or {}
            ladder = Ladder(float(options.get("escalate_after_s") or settings.escalate_after_s),
                            float(options.get("kill_after_s") or settings.kill_after_s))
            monitor = JobMonitor(job.id, token, settings.heartbeat_s,
                                 options.get("max_rss_mb") or settings.max_job_rss_mb, ladder)
            monitor.start()
            machinery.callback(monitor.stop)
            deadline = _start_deadline(job)
            if deadline is not None:
                machinery.callback(deadline.cancel)
            scratch = self.cleanup.temp_dir(job_scratch_dir(job.id))
            pipeline_options = self.pipeline.options_value(
                {k: v for k, v in options.items() if k not in ANDON_OPTIONS})

            def context(index: int) -> JobContext:
                return JobContext(job.id, index, pipeline_options, token, self.cleanup, scratch)

            def position(index: int, stage: str) -> None:
                monitor.position = self.reached = (index, stage)

            items = ItemRun(self.pipeline, token, context, self._commit, position)
            monitor.force = items.force
            try:
                with session_scope() as session:
                    self.finished = job_rows.finished_indexes(session, job.id)
                todo = [(i, raw) for i, raw in enumerate(job.inputs) if i not in self.finished]
                items.run(todo)
            except BaseException as exc:
                monitor.disarm()
                return self._stopped(exc, items.observed_at)
            monitor.disarm()
            self._release()
            return lifecycle.finish_ran_through(job.id)

    def _commit(self, record: ItemRecord) -> None:
        """Store one item the moment it ends (called in this thread, in order)."""
        with transaction() as conn:
            job_rows.record_item(conn, self.job.id, record.index, record.stage, record.status, result=record.result,
                                 error=record.error, started_at=record.started_at, finished_at=record.finished_at)
        if record.status is not ItemStatus.INTERRUPTED:
            self.finished.add(record.index)

    def _stopped(self, exc: BaseException, observed_at: datetime | None) -> JobOutcome:
        cancel = cancellation_in(exc)
        if isinstance(cancel, ForcedCancellation) or (cancel is not None and cancel.reason is None):
            cancel = self.token.error()
        if cancel is None and self.token.is_cancelled:  # torn down after a cancel: that cancel is why
            cancel = self.token.error()
        self._release()
        if cancel is not None:
            at_item = next((i for i in range(self.job.total_items) if i not in self.finished), None)
            lifecycle.end_cancelled(self.job.id, cancel, at_item=at_item,
                                    stage=self.reached[1] if self.reached else None, observed_at=observed_at)
            if isinstance(exc, CancellationError) or cancellation_in(exc) is not None:
                return JobOutcome(self.job.id, JobStatus.CANCELLED, ran=True, reason=cancel.reason)
            raise exc
        if not isinstance(exc, SystemExit):
            lifecycle.end_failed(self.job.id, f"{type(exc).__name__}: {exc}")
        raise exc

    def _release(self) -> None:
        """Clean up *before* the terminal row is committed: whoever sees a job ended sees it tidy."""
        if self.cleanup.done:
            return
        errors = self.cleanup.run()
        errors += [f"token callback: {e!r}" for e in self.token.callback_errors]
        if errors:
            log.warning("cleanup of job %s: %s", self.job.id, errors)
            with session_scope() as session:
                job_rows.add_event(session, self.job.id, EventKind.CLEANUP_FAILED, detail={"errors": errors})


def _start_deadline(job: Job) -> threading.Timer | None:
    if not job.deadline_s:
        return None
    remaining = job.deadline_s - (datetime.now(UTC) - job.created_at).total_seconds()

    def expire() -> None:
        try:
            request_cancel(job.id, CancellationReason.TIMEOUT, f"deadline of {job.deadline_s:g}s passed",
                           CancellationSource.DEADLINE, actor="worker")
        except AndonError:
            pass  # the job ended in the meantime

    timer = threading.Timer(max(remaining, 0.0), expire)
    timer.daemon = True
    timer.start()
    return timer
