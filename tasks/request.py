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
from tasks.control import finalize_stopped, recover_lost_run

__all__ = ["JobRequest", "on_worker_lost"]

log = logging.getLogger(__name__)

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
    """The child running ``job_id`` died; Celery requeues the message itself (acks_late +
    reject_on_worker_lost), so the row goes back to ``pending`` without a new message."""
    recover_lost_run(job_id, actor=hostname, resend=False)
