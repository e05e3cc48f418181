"""What a worker does at the moments Celery tells it about (connected by :mod:`tasks.wiring`).

Named after the moment they run. Everything here runs in the worker's main process except
``after_child_fork``.
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
import time

from celery.worker import state as worker_state
from sqlalchemy import select

from db.forks import guard_forks
from db.models import Job
from db.session import session_scope
from db.settings import get_settings
from db.vocabulary import CancellationReason, CancellationSource, JobStatus
from tasks.after_stop import apply_pending_policies
from tasks.broker import release_parked, resend_lost
from tasks.cancellation.keys import sweep_lock_key
from tasks.control import finalize_stopped, request_cancel
from tasks.errors import AndonError
from tasks.process import get_redis, reset_process_state
from tasks.reaper import Reaper
from tasks.results import ResultSweep
from tasks.resume import auto_resume_after_shutdown

log = logging.getLogger(__name__)

#: Jobs that were running here when a shutdown began; finalized if they haven't ended by themselves.
_shutdown_jobs: set[str] = set()


def before_pool_starts(**_: object) -> None:
    """In the main process, before it forks its first pool child: a fork waits for this process's
    threads (the sweeps, the reaper) to be out of SQLite (:mod:`db.forks`)."""
    guard_forks()


def after_child_fork(**_: object) -> None:
    """A prefork child must not share its parent's Redis sockets or watcher thread. What it inherited
    (Celery, kombu, SQLAlchemy, the pipelines: 100,000s of objects that live as long as it does) is
    frozen out of the garbage collector's walks: a full collection walking them all took tens of
    milliseconds in the middle of a job — a cancel's observation or a job's end waiting behind it —
    and they are never garbage. (``gc.freeze`` moves them at once; it walks nothing.)"""
    reset_process_state()
    gc.freeze()


def _active_job_ids() -> list[str]:
    return [request.id for request in list(worker_state.active_requests)]


def cancel_active_jobs_for_shutdown(how: str, hostname: str | None) -> list[str]:
    """Every job running here gets ``system_shutdown``; each stops at its next checkpoint.

    Only jobs that *run*: a message this worker holds for a job still queued (sent back because this
    worker doesn't know its pipeline, or not started yet) goes back to the queue with the worker's
    unacked messages, and the job must stay queued for the next worker, not be cancelled."""
    job_ids = _running(_active_job_ids())
    _shutdown_jobs.update(job_ids)
    for job_id in job_ids:
        try:
            request_cancel(job_id, CancellationReason.SYSTEM_SHUTDOWN, f"worker {how.lower()} shutdown",
                           CancellationSource.WORKER_SHUTDOWN, actor=hostname)
        except AndonError:
            pass
        except Exception:
            log.exception("andon: could not cancel %s for shutdown", job_id)
    return job_ids


def _running(job_ids: list[str]) -> list[str]:
    if not job_ids:
        return []
    with session_scope() as session:
        return list(session.scalars(select(Job.id).where(
            Job.id.in_(job_ids), Job.status.in_([JobStatus.RUNNING.value, JobStatus.CANCELLING.value]))))


def on_worker_shutting_down(sig: str, how: str, exitcode: int, sender: str | None = None, **_: object) -> None:
    """Warm: cancel every running job now; Celery then waits for them, and they end at once.

    Remote control is dead during Celery's warm drain, so the token is the only way to reach them.
    Cold: Celery has already SIGTERMed the children (our SIGQUIT hook cancelled their tokens first);
    any row still open is finalized here, so nothing is left ``running``.
    """
    if how == "Warm":
        cancel_active_jobs_for_shutdown(how, sender)
    else:
        _finalize_shutdown_jobs(sender)


def _finalize_shutdown_jobs(hostname: str | None) -> None:
    for job_id in list(_shutdown_jobs) + _active_job_ids():
        try:
            finalize_stopped(job_id, CancellationReason.SYSTEM_SHUTDOWN, CancellationSource.WORKER_SHUTDOWN,
                             "worker cold shutdown", actor=hostname)
        except Exception:
            log.exception("andon: could not finalize %s at shutdown", job_id)


def after_worker_ready(sender=None, **_: object) -> None:
    hostname = getattr(sender, "hostname", None)
    _cancel_before_cold_shutdown(sender)
    _start_reaper(hostname)
    if get_settings().auto_resume:
        threading.Thread(target=_auto_resume, args=(hostname,), name="andon-auto-resume", daemon=True).start()


def _auto_resume(hostname: str | None, attempts: int = 30, every_s: float = 2.0) -> None:
    """Resume what a shutdown of this worker stopped; retry a while if Redis or the broker is away."""
    for _ in range(attempts):
        try:
            resumed, left = auto_resume_after_shutdown(hostname)
        except Exception:
            log.exception("andon: auto-resume pass failed")
            left = 1
        else:
            for job_id in resumed:
                log.info("andon: resumed a job stopped by a shutdown as %s", job_id)
        if not left:
            return
        time.sleep(every_s)


def _cancel_before_cold_shutdown(consumer) -> None:
    """Wrap Celery's SIGQUIT (cold shutdown) handler: cancel the tokens first, give the jobs
    ``worker_soft_shutdown_timeout`` to stop at a checkpoint (Celery's own wait), then let Celery
    SIGTERM whatever is left."""
    hostname = getattr(consumer, "hostname", None)
    celery_handler = signal.getsignal(signal.SIGQUIT)
    if not callable(celery_handler):
        return

    def on_sigquit(signum, frame):
        try:
            cancel_active_jobs_for_shutdown("Cold", hostname)
        finally:
            celery_handler(signum, frame)

    signal.signal(signal.SIGQUIT, on_sigquit)


def _start_reaper(hostname: str | None) -> None:
    settings = get_settings()
    reaper = Reaper(settings.heartbeat_s)
    results = ResultSweep(settings.result_settle_after_s, settings.result_settle_window_s)
    next_sweep = time.monotonic()

    def loop() -> None:
        nonlocal next_sweep
        while True:
            time.sleep(reaper.heartbeat_s)
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + get_settings().broker_sweep_s
                _sweep_broker(hostname, results)
            try:
                for job_id in reaper.reap(actor=f"reaper:{hostname}"):
                    log.warning("andon: reaped lost job %s", job_id)
            except Exception:
                log.exception("andon: reaper pass failed")

    threading.Thread(target=loop, name="andon-reaper", daemon=True).start()


def _sweep_broker(hostname: str | None, results: ResultSweep) -> None:
    """Lost and parked messages (tasks/broker.py) and Celery results its rows disagree with
    (tasks/results.py), by one worker at a time."""
    settings = get_settings()
    try:
        if not get_redis().set(sweep_lock_key(), hostname or "worker", nx=True,
                               ex=max(1, int(settings.broker_sweep_s))):
            return
        for job_id in resend_lost(settings.lost_message_after_s, settings.resend_uninspectable_after_s,
                                  actor=f"reaper:{hostname}"):
            log.warning("andon: job %s had lost its message; sent again", job_id)
        for job_id in release_parked(settings.parked_after_s):
            log.warning("andon: acked the parked message of ended job %s", job_id)
        for job_id in apply_pending_policies():
            log.warning("andon: a policy resume its cancelling process couldn't queue was made now: %s", job_id)
        for job_id in results.run():
            log.warning("andon: wrote the Celery state of ended job %s that its run could not", job_id)
    except Exception:
        log.exception("andon: broker sweep failed")


def on_task_revoked(request=None, terminated: bool = False, signum=None, expired: bool = False, **_: object) -> None:
    """Celery discarded or terminated a job (main process). If its child was killed, the job could
    not record its own end; do it here with the reason of the cancel that preceded the signal."""
    if request is None:
        return
    try:
        finalize_stopped(request.id, CancellationReason.USER_REQUESTED, CancellationSource.REVOKE,
                         f"terminated by signal {signum}" if terminated else "revoked before it started",
                         actor=getattr(request, "hostname", None))
    except Exception:
        log.exception("andon: could not finalize revoked job %s", request.id)
