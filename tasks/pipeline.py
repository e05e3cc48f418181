"""Running one job: every item through parse → embed → analyze, a checkpoint before each stage.

This is the worker's service layer; the Celery task only hands it a job id. Each finished item is
committed as its own row at once, so a later cancel, crash or kill loses nothing already done.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from db import jobs as job_rows
from db.models import Job
from db.session import session_scope, transaction
from db.settings import get_settings
from db.vocabulary import (
    RESUMABLE_REASONS,
    CancellationReason,
    CancellationSource,
    EventKind,
    ItemStatus,
    JobStatus,
    Stage,
)
from tasks import stages
from tasks.cleanup import CleanupManager
from tasks.control import request_cancel
from tasks.errors import AndonError, CancellationError, ForcedCancellation, JobNotFound
from tasks.llm import StreamCancelled, analyze_llm
from tasks.monitor import JobMonitor, Ladder
from tasks.store import get_watcher
from tasks.token import CancellationToken

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobOutcome:
    job_id: str
    status: JobStatus
    ran: bool  # False when the job was already terminal (e.g. cancelled while queued)
    reason: CancellationReason | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "status": self.status.value, "ran": self.ran,
                "reason": self.reason.value if self.reason else None, "error": self.error}


StageFn = Callable[[Any], Any]


def stage_functions(options: dict[str, Any], token: CancellationToken) -> list[tuple[Stage, StageFn]]:
    analyzer = options.get("analyzer", "local")
    if analyzer == "local":
        analyze: StageFn = stages.analyze_local
    elif analyzer == "llm":
        settings = get_settings()
        analyze = functools.partial(analyze_llm, token=token, base_url=settings.llm_base_url,
                                    model=settings.llm_model, api_key=settings.llm_api_key,
                                    timeout_s=settings.llm_timeout_s)
    else:
        raise AndonError(f"unknown analyzer {analyzer!r}")
    return [(Stage.PARSE, stages.parse), (Stage.EMBED, stages.embed), (Stage.ANALYZE, analyze)]


def _finish_cancelled(job_id: str, error: CancellationError, at_item: int | None, stage: Stage | None) -> bool:
    now = datetime.now(UTC)
    with session_scope() as session:
        job_rows.add_event(
            session, job_id, EventKind.CANCEL_OBSERVED,
            reason=error.reason.value, source=error.source.value if error.source else None,
            detail={"item": at_item, "stage": stage.value if stage else None}, at=now,
        )
        return job_rows.transition(
            session, job_id, JobStatus.CANCELLED,
            cancellation_reason=error.reason.value,
            cancellation_message=error.message,
            cancellation_source=error.source.value if error.source else None,
            cancel_observed_at=now,
            cancelled_at_item=at_item,
            resumable=error.reason in RESUMABLE_REASONS,
        )


def _start(job_id: str) -> Job | None:
    """Load the job and move it to running; None if it must not run (terminal, or unknown)."""
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise JobNotFound(job_id)
        status = JobStatus(job.status)
        if status.is_terminal:
            return None
        redelivered = status is not JobStatus.PENDING  # acks_late: the last worker died mid-job
        if not redelivered and not job_rows.transition(
            session, job_id, JobStatus.RUNNING, started_at=datetime.now(UTC)
        ):
            return None
        job_rows.add_event(session, job_id, EventKind.STARTED, detail={"redelivered": redelivered})
        session.expunge(job)
        return job


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


def run_job(job_id: str) -> JobOutcome:
    """Run a job to exactly one terminal state, keeping every finished item, cleaning up always.

    If the process is being torn down under the job (``SystemExit`` from a SIGTERM sent by Celery's
    terminate, hard time limit or cold shutdown) and no cancel was requested, the row is left for the
    worker's main process to finalize: only it knows which of those it was.
    """
    watcher = get_watcher()
    token = watcher.watch(job_id)
    job = _start(job_id)
    if job is None:
        watcher.unwatch(job_id)
        with session_scope() as session:
            row = session.get(Job, job_id)
        return JobOutcome(job_id, JobStatus(row.status), ran=False,
                          reason=CancellationReason(row.cancellation_reason) if row.cancellation_reason else None)

    settings = get_settings()
    cleanup = CleanupManager()  # what the job acquired: released before its terminal row is committed
    ladder = Ladder(float(job.options.get("escalate_after_s") or settings.escalate_after_s),
                    float(job.options.get("kill_after_s") or settings.kill_after_s))
    monitor = JobMonitor(job_id, token, settings.heartbeat_s,
                         job.options.get("max_rss_mb") or settings.max_job_rss_mb, ladder)
    monitor.start()
    deadline = _start_deadline(job)
    cleanup.temp_dir(settings.jobs_tmp_dir / job_id)  # the job's scratch space, gone on every exit path
    delay = float(job.options.get("stage_delay_s") or 0)
    block = float(job.options.get("stage_block_s") or 0)
    spin = float(job.options.get("stage_spin_s") or 0)
    index: int | None = None
    stage: Stage | None = None

    def release() -> None:
        """Clean up *before* the terminal row is committed: whoever sees a job ended sees it tidy."""
        if cleanup.done:
            return
        errors = cleanup.run()
        errors += [f"token callback: {e!r}" for e in token.callback_errors]
        if errors:
            log.warning("cleanup of job %s: %s", job_id, errors)
            with session_scope() as session:
                job_rows.add_event(session, job_id, EventKind.CLEANUP_FAILED, detail={"errors": errors})

    try:
        with session_scope() as session:
            finished = job_rows.finished_indexes(session, job_id)
        pipeline = stage_functions(job.options, token)
        for index, document in enumerate(job.documents):
            if index in finished:
                continue
            started_at = datetime.now(UTC)
            value: Any = document
            try:
                for stage, run_stage in pipeline:
                    token.check()  # the checkpoint: before every stage of every item
                    monitor.position = (index, stage.value)
                    if delay and token.wait(delay):
                        token.check()
                    if block:
                        time.sleep(block)  # deaf to the token, like a blocking C call
                    if spin:
                        _spin(spin)  # deaf to the token, like a stuck Python loop
                    value = run_stage(value)
            except StreamCancelled as cancelled:  # keep what the model had said, marked as cut short
                with transaction() as conn:
                    job_rows.record_item(conn, job_id, index, stage.value, ItemStatus.FAILED,
                                         result=cancelled.partial, error="cancelled mid-stream",
                                         started_at=started_at)
                raise
            except CancellationError:
                raise
            except Exception as exc:
                with transaction() as conn:
                    job_rows.record_item(conn, job_id, index, stage.value, ItemStatus.FAILED,
                                         error=f"{type(exc).__name__}: {exc}", started_at=started_at)
                continue
            with transaction() as conn:
                job_rows.record_item(conn, job_id, index, stage.value, ItemStatus.DONE,
                                     result=value, started_at=started_at)
        release()
        return _finish_ran_through(job_id)
    except CancellationError as error:
        monitor.observed.set()
        if isinstance(error, ForcedCancellation):
            error = token.error()
        release()
        _finish_cancelled(job_id, error, index, stage)
        return JobOutcome(job_id, JobStatus.CANCELLED, ran=True, reason=error.reason)
    except BaseException as exc:
        monitor.observed.set()
        release()
        if token.is_cancelled:  # torn down after a cancel was requested: that cancel is why
            _finish_cancelled(job_id, token.error(), index, stage)
        elif not isinstance(exc, SystemExit):
            with session_scope() as session:
                job_rows.transition(session, job_id, JobStatus.FAILED, error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        release()  # a no-op when an exit path above already ran it
        # the job's own machinery stops only now: its heartbeat lives until the row is terminal,
        # so the reaper never mistakes a job that is finishing for a lost one
        if deadline is not None:
            deadline.cancel()
        monitor.stop()
        watcher.unwatch(job_id)


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def _finish_ran_through(job_id: str) -> JobOutcome:
    """Every item was tried: completed, unless not a single one succeeded."""
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job.total_items and job.completed_items == 0:
            error = f"all {job.total_items} items failed"
            if job_rows.transition(session, job_id, JobStatus.FAILED, error=error):
                return JobOutcome(job_id, JobStatus.FAILED, ran=True, error=error)
        elif job_rows.transition(session, job_id, JobStatus.COMPLETED):
            return JobOutcome(job_id, JobStatus.COMPLETED, ran=True)
        # someone else ended it first (a finalizer): report what the row says, not what we hoped
        session.expire_all()
        row = session.get(Job, job_id)
        reason = CancellationReason(row.cancellation_reason) if row.cancellation_reason else None
        return JobOutcome(job_id, JobStatus(row.status), ran=True, reason=reason, error=row.error)
