"""Running one job in a worker: the same for every pipeline, built-in or a user's.

The Celery task hands a job id to :func:`run_job`. A :class:`JobRun` owns everything the job starts —
its token watch, heartbeat and escalation ladder, deadline timer and scratch dir — in one
``ExitStack``, so the exit path is single: whatever stops the job, in-flight items are recorded,
the job's resources are released *before* its terminal row is committed (whoever sees a job ended
sees it tidy), and its machinery stops only *after* (so the reaper never mistakes a finishing job
for a lost one). Finished items are committed in groups within a few milliseconds of ending
(:mod:`tasks.commits`), and always before the job's terminal row: a later cancel, crash or kill
loses nothing already done, except a SIGKILL from outside, which can lose the last window.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select

from db import jobs as job_rows
from db.jobs import NotOwner
from db.models import Job
from db.session import get_engine, is_transient, retry_transient, session_scope, statement_writes, transaction
from db.settings import get_settings
from db.vocabulary import CancellationReason, CancellationSource, EventKind, ItemStatus, JobStatus
from tasks import lifecycle, registry
from tasks.after_stop import act_after_cancel
from tasks.cancellation import CancellationError, CancellationToken, ForcedCancellation, cancellation_in
from tasks.cancellation.keys import heartbeat_key
from tasks.cleanup import CleanupManager
from tasks.commits import ItemCommitter
from tasks.context import JobContext
from tasks.control import request_cancel
from tasks.engine import ItemRecord, ItemRun
from tasks.errors import AndonError, JobNotFound
from tasks.intake import ANDON_OPTIONS
from tasks.lifecycle import JobOutcome
from tasks.monitor import JobMonitor, Ladder
from tasks.paths import check_job_id, job_scratch_dir, remove_tree
from tasks.pipeline import Pipeline
from tasks.process import get_redis, get_watcher

__all__ = ["DuplicateDelivery", "JobRun", "owner_alive", "run_job"]

log = logging.getLogger(__name__)

def run_job(job_id: str) -> JobOutcome:
    """Run a job to exactly one terminal state, keeping every finished item, cleaning up always.

    One owner at a time: a queued job is started by exactly one delivery; a second delivery of a
    running job whose owner is alive does nothing (:class:`DuplicateDelivery`); one whose owner is
    gone takes it over and runs the items not done (:func:`lifecycle.take_over`). The fence in the
    job row, checked on every item write, keeps a run that lost the job from writing anything more.

    Raises :class:`~tasks.errors.UnknownPipeline` *before* touching the row when this worker doesn't
    know the job's pipeline (the task sends the job back for a worker that does). If the process is
    torn down under the job (``SystemExit`` from Celery's terminate, hard time limit or cold
    shutdown) and no cancel was requested, the row is left for the worker's main process to finalize:
    only it knows which of those it was.
    """
    check_job_id(job_id)
    settings = get_settings()
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def start() -> Job | None:
        return retry_transient(lambda: lifecycle.start(job_id, owner, pipelines=[p.name for p in registry.pipelines()]),
                               within_s=settings.db_retry_s)

    # the usual delivery, a queued job of a pipeline known here, is started by one statement; any
    # other (ended, running elsewhere, a pipeline this worker doesn't know) is read to tell which
    job = start()
    if job is None:
        with get_engine().connect() as conn:
            row = conn.execute(select(Job.status, Job.fence, Job.pipeline).where(Job.id == job_id)).one_or_none()
        if row is None:
            raise JobNotFound(job_id)
        status, seen_fence = JobStatus(row.status), row.fence
        if status.is_terminal:
            return lifecycle.outcome_of(job_id, ran=False)
        registry.get(row.pipeline)  # UnknownPipeline before the row is touched: sent back for a worker that knows it
        if status is JobStatus.PENDING:
            job = start()  # it was queued after all (a pipeline loaded meanwhile)
        elif owner_alive(job_id):
            raise DuplicateDelivery(job_id)
        else:
            job = lifecycle.take_over(job_id, seen_fence, owner)
    if job is None:  # another delivery moved first, or the job just ended
        if lifecycle.outcome_of(job_id, ran=False).status.is_terminal:
            return lifecycle.outcome_of(job_id, ran=False)
        raise DuplicateDelivery(job_id)
    pipeline = registry.get(job.pipeline)
    watcher = get_watcher()
    token = watcher.watch(job_id)
    return JobRun(job, pipeline, token, owner).execute(watcher)


def owner_alive(job_id: str) -> bool:
    """Is the run that owns ``job_id`` alive? Its heartbeat says so. A missing beat is looked at
    twice, a beat and a half apart (a Redis restart loses keys; a live owner beats again). Redis away
    raises: without it, nobody can tell, and the delivery is tried again later."""
    beats = get_redis()
    key = heartbeat_key(job_id)
    if beats.exists(key):
        return True
    time.sleep(get_settings().heartbeat_s * 1.5)
    return bool(beats.exists(key))


class DuplicateDelivery(AndonError):
    """This delivery of a job found it owned by a live run: it does nothing (Celery acks it)."""


class JobRun:
    """One run of one job in this process, owning it (``fence``) until it ends or loses it."""

    def __init__(self, job: Job, pipeline: Pipeline, token: CancellationToken, owner: str) -> None:
        self.job = job
        self.pipeline = pipeline
        self.token = token
        self.owner = owner
        self.fence = job.fence
        self.cleanup = CleanupManager()  # what the job acquired: released before its terminal row
        self.finished: set[int] = set()
        self.completed = job.completed_items  # the job's done items, this run's writes included
        self.reached: tuple[int, str] | None = None
        self.lost = False  # another run took the job over: write nothing more
        self.unwritten: list[ItemRecord] = []  # items that ended while the database was away
        self.settings = get_settings()
        self._scratch: Path | None = None
        self._scratch_lock = threading.Lock()
        self.committer: ItemCommitter[ItemRecord] = ItemCommitter(
            self._commit, self.settings.item_commit_window_ms / 1000, name=f"andon-commit-{job.id[:8]}")

    def execute(self, watcher) -> JobOutcome:
        job, token, settings = self.job, self.token, self.settings
        with ExitStack() as machinery:  # unwinds after the terminal row is committed
            machinery.callback(watcher.unwatch, job.id)
            options = job.options or {}
            ladder = Ladder(float(options.get("escalate_after_s") or settings.escalate_after_s),
                            float(options.get("kill_after_s") or settings.kill_after_s))
            monitor = JobMonitor(job.id, token, settings.heartbeat_s,
                                 options.get("max_rss_mb") or settings.max_job_rss_mb, ladder, owner=self.owner)
            monitor.before_kill = lambda: self.committer.flush(timeout=1.0)
            monitor.start()
            machinery.callback(monitor.stop)
            deadline = _start_deadline(job)
            if deadline is not None:
                machinery.callback(deadline.cancel)
            scratch = self._scratch_dir
            pipeline_options = self.pipeline.options_value(
                {k: v for k, v in options.items() if k not in ANDON_OPTIONS})

            def context(index: int) -> JobContext:
                return JobContext(job.id, index, pipeline_options, token, self.cleanup, scratch)

            def position(index: int, stage: str) -> None:
                monitor.position = self.reached = (index, stage)

            items = ItemRun(self.pipeline, token, context, self.committer.add, position)
            monitor.force = items.force
            try:
                if job.completed_items or job.failed_items:  # a resumed or taken-over job: skip its done items
                    self.finished = retry_transient(self._finished_indexes, within_s=settings.db_retry_s)
                todo = [(i, raw) for i, raw in enumerate(job.inputs) if i not in self.finished]
                items.run(todo)
                last = self.committer.detach()  # written with the terminal row, in its transaction
            except BaseException as exc:
                monitor.disarm()
                return self._stopped(exc, items.observed_at)
            monitor.disarm()
            if self.lost:
                return self._lost()
            try:
                self._release()
            except BaseException:
                self._commit(last)  # a cleanup that raised must not cost the items that ended
                raise
            return self._finish(last)

    def _finish(self, last: list[ItemRecord]) -> JobOutcome:
        """End a job that ran through: its last items and its terminal row in one transaction."""
        done = sum(1 for r in last if r.status is ItemStatus.DONE)
        try:
            outcome = self._durably(lambda: lifecycle.finish_ran_through(
                self.job.id, self.fence, counts=(self.job.total_items, self.completed + done), items=last))
        except NotOwner:
            self._lose()
            return self._lost()
        self._counted(last)
        return outcome

    def _scratch_dir(self) -> Path:
        """This run's scratch dir, made on first use (by any stage's thread) and removed at cleanup."""
        with self._scratch_lock:
            if self._scratch is None:
                self._scratch = self.cleanup.temp_dir(job_scratch_dir(self.job.id, run=self.fence))
            return self._scratch

    def _finished_indexes(self) -> set[int]:
        with session_scope() as session:
            return job_rows.finished_indexes(session, self.job.id)

    def _commit(self, records: list[ItemRecord]) -> None:
        """Store a group of items that ended, in order, in one transaction (the committer calls it,
        one group at a time). A transient database error is retried for ``db_retry_s``; if the
        database stays away, the items are kept in memory, the job is stopped (``system_shutdown``,
        source ``database_unavailable``) and everything is written once the database is back. A run
        that lost the job writes nothing more."""
        if self.lost:
            return
        if self.unwritten:
            self.unwritten.extend(records)
            return
        try:
            retry_transient(lambda: self._write(records), within_s=self.settings.db_retry_s, what="item write")
        except NotOwner:
            self._lose()
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.error("job %s: the database is unavailable (%s); stopping the job", self.job.id, exc)
            self.unwritten.extend(records)
            self.token.cancel(CancellationReason.SYSTEM_SHUTDOWN, "the database was unavailable",
                              CancellationSource.DATABASE_UNAVAILABLE)

    def _write(self, records: list[ItemRecord]) -> None:
        # on PostgreSQL the write is one statement, committed as it runs: one round trip
        postgres = get_engine().dialect.name == "postgresql"
        with statement_writes() if postgres else transaction() as conn:
            job_rows.record_items(conn, self.job.id, records, fence=self.fence)
        self._counted(records)

    def _why_cancelled(self, exc: BaseException) -> CancellationError | None:
        """The cancel that stopped the run, if one did: the exception's, or the token's when the
        exception carries no reason (forced) or the run was torn down after a cancel."""
        cancel = cancellation_in(exc)
        if isinstance(cancel, ForcedCancellation) or (cancel is not None and cancel.reason is None):
            cancel = self.token.error()
        if cancel is None and self.token.is_cancelled:
            cancel = self.token.error()
        return cancel

    def _close_committer(self) -> None:
        """On a stop: write the items still in the window before anything else (a hard time limit
        leaves this process a tenth of a second). A write error is logged: the stop goes on."""
        try:
            self.committer.close()
        except NotOwner:
            self._lose()
        except Exception:
            log.exception("job %s: writing its last items failed", self.job.id)

    def _detach_committer(self) -> list[ItemRecord]:
        """On a cancel: stop the writer and take the items it had not written yet (the terminal
        row's transaction writes them). An earlier background write's error is handled as
        :meth:`_close_committer` does."""
        try:
            return self.committer.detach()
        except NotOwner:
            self._lose()
        except Exception:
            log.exception("job %s: writing its items failed", self.job.id)
        return []

    def _counted(self, records: list[ItemRecord]) -> None:
        self.finished.update(r.index for r in records if r.status is not ItemStatus.INTERRUPTED)
        self.completed += sum(1 for r in records if r.status is ItemStatus.DONE)

    def _lose(self) -> None:
        """Another delivery took the job over: stop this run's items, write nothing more."""
        log.warning("job %s: taken over by another run; this run (%s) stops", self.job.id, self.owner)
        self.lost = True
        if not self.token.is_cancelled:
            self.token.cancel(CancellationReason.SYSTEM_SHUTDOWN, "taken over by another run",
                              CancellationSource.WORKER_LOST)

    def _lost(self) -> JobOutcome:
        self._release(own_run_only=True)
        raise DuplicateDelivery(self.job.id)

    def _durably(self, write):
        """The end of a job is written whatever it takes: retried until the database is back (for
        ``db_outage_max_s``), the items that ended meanwhile first."""
        within = self.settings.db_outage_max_s

        def flush_then_write():
            if self.unwritten:
                try:
                    self._write(self.unwritten)
                except NotOwner:
                    self.lost = True
                    self.unwritten.clear()
                    raise
                self.unwritten.clear()
            return write()

        return retry_transient(flush_then_write, within_s=within, what="end of job")

    def _stopped(self, exc: BaseException, observed_at: datetime | None) -> JobOutcome:
        # a cancel's last items go in with its terminal row (one commit); any other stop (a failure, a
        # teardown that may leave this process a tenth of a second) writes them first, on their own
        last: list[ItemRecord] = []
        if cancellation_in(exc) is not None:
            last = self._detach_committer()
        else:
            self._close_committer()
        if self.lost or isinstance(exc, NotOwner):
            return self._lost()
        cancel = self._why_cancelled(exc)
        self._release()
        if cancel is not None:
            ended = self.finished | {r.index for r in last if r.status is not ItemStatus.INTERRUPTED}
            at_item = next((i for i in range(self.job.total_items) if i not in ended), None)

            def end() -> bool:
                return lifecycle.end_cancelled(self.job.id, cancel, at_item=at_item,
                                               stage=self.reached[1] if self.reached else None,
                                               observed_at=observed_at, fence=self.fence,
                                               requested=self.token.first_request, items=last)
            try:
                if self._durably(end):
                    act_after_cancel(self.job.id)  # its per-reason policy may resume it at once
            except NotOwner:
                return self._lost()
            self._counted(last)
            if isinstance(exc, CancellationError) or cancellation_in(exc) is not None:
                return JobOutcome(self.job.id, JobStatus.CANCELLED, ran=True, reason=cancel.reason)
            raise exc
        if not isinstance(exc, SystemExit):
            self._durably(lambda: lifecycle.end_failed(self.job.id, f"{type(exc).__name__}: {exc}", self.fence))
        raise exc

    def _release(self, own_run_only: bool = False) -> None:
        """Clean up *before* the terminal row is committed: whoever sees a job ended sees it tidy
        (its whole scratch dir goes, runs that lost it included)."""
        if not self.cleanup.done:
            errors = self.cleanup.run()
            errors += [f"token callback: {e!r}" for e in self.token.callback_errors]
            if errors and not own_run_only:
                log.warning("cleanup of job %s: %s", self.job.id, errors)
                with session_scope() as session:
                    job_rows.add_event(session, self.job.id, EventKind.CLEANUP_FAILED, detail={"errors": errors})
        # the job's scratch dir; none to remove for the job's first run (fence 1) if it made none
        if not own_run_only and (self._scratch is not None or self.fence > 1):
            remove_tree(job_scratch_dir(self.job.id))


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
