"""What the worker's *main* process does when a job's child process dies under it.

A hard time limit kills the child; a SIGKILL or the OOM killer loses it. Nothing runs in the child
then, so the row would stay ``running`` forever. Celery reports both to the main process through
the task's Request (``on_timeout`` / ``on_failure``) — see celery/worker/request.py — and we finalize
the row there. (Celery's generated Request subclass overrides ``on_success``, so only these two
hooks are usable.)
"""

from __future__ import annotations

import logging

from billiard.exceptions import WorkerLostError
from celery.worker.request import Request

from db.vocabulary import CancellationReason, CancellationSource
from tasks import lifecycle
from tasks.cancellation.keys import lost_key
from tasks.control import finalize_stopped
from tasks.errors import InvalidJobId
from tasks.paths import job_scratch_dir, remove_tree
from tasks.process import get_redis, get_store

__all__ = ["JobRequest", "on_worker_lost"]

log = logging.getLogger(__name__)

#: A job whose worker is lost this many times is failed instead of requeued (a poison job).
MAX_LOSSES = 2


class JobRequest(Request):
    def on_timeout(self, soft: bool, timeout: float) -> None:
        super().on_timeout(soft, timeout)
        if not soft:
            _guard(finalize_stopped, self.id, CancellationReason.TIMEOUT, CancellationSource.TIME_LIMIT,
                   f"Celery hard time limit ({timeout:g}s) exceeded", actor=self.hostname)

    def on_failure(self, exc_info, send_failed_event: bool = True, return_ok: bool = False) -> None:
        exc = getattr(exc_info, "exception", None)
        if isinstance(getattr(exc, "exc", exc), WorkerLostError):
            _guard(on_worker_lost, self.id, self.hostname)
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)


def _guard(fn, *args, **kwargs) -> None:
    """Never let bookkeeping break the worker's main loop."""
    try:
        fn(*args, **kwargs)
    except Exception:
        log.exception("andon: %s failed for %s", fn.__name__, args[:1])


def on_worker_lost(job_id: str, hostname: str | None = None) -> None:
    """The child running ``job_id`` died. Celery requeues the message (acks_late + reject_on_worker_lost).

    If a cancel had been requested (e.g. the memory watchdog, or a forced terminate) the job ends
    ``cancelled`` with that reason. Otherwise it goes back to ``pending`` to run again from its first
    unfinished item — once; lost a second time, it is ``failed``.
    """
    if get_store().read([job_id]):
        finalize_stopped(job_id, CancellationReason.USER_REQUESTED, CancellationSource.WORKER_LOST,
                         "worker process lost after a cancel was requested", actor=hostname)
        return
    key = lost_key(job_id)
    losses = get_redis().incr(key)
    get_redis().expire(key, 7 * 24 * 3600)
    if losses >= MAX_LOSSES:
        finalize_stopped(job_id, CancellationReason.USER_REQUESTED, CancellationSource.WORKER_LOST,
                         fail_with=f"worker process lost {losses} times", actor=hostname)
        return
    lifecycle.requeue(job_id, CancellationSource.WORKER_LOST, hostname, {"losses": losses})
    try:  # the dead child's scratch space: the next run makes its own
        remove_tree(job_scratch_dir(job_id))
    except InvalidJobId:
        pass
