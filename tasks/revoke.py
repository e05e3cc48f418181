"""Celery's revoke, made to stop running jobs: the remote-control commands, wrapped.

Plain Celery ``revoke`` only flags an id; a task already running carries on and ends SUCCESS
(celery/worker/control.py ``_revoke`` skips active requests). ``terminate=True`` SIGTERMs the child
at once, wherever it is. Flower's Revoke and Terminate buttons, ``app.control.revoke`` and
``celery control revoke/terminate`` all arrive here, in the worker's main process, so we wrap the
commands themselves:

* revoke → the job's token is cancelled (``user_requested``, source ``revoke``, or a ``reason`` /
  ``message`` passed as extra revoke arguments); the job stops at its next checkpoint.
* terminate → the same cooperative cancel first; the signal only after a grace period
  (``ANDON_TERMINATE_GRACE_S``, or a ``grace`` revoke argument), on the worker's own timer. A job
  that stopped in time is no longer active then, and the signal goes nowhere.

Celery's own bookkeeping (the revoked set, REVOKED for queued ids) still runs unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker import state as worker_state
from celery.worker.control import Panel, control_command, ok
from kombu.utils.functional import maybe_list

from db.models import Job
from db.session import session_scope
from db.settings import get_settings
from db.vocabulary import CancellationReason, CancellationSource, JobStatus
from tasks.control import request_cancel
from tasks.errors import AndonError

log = logging.getLogger(__name__)

_celery_revoke = Panel.data["revoke"]
_celery_revoke_by_stamped_headers = Panel.data["revoke_by_stamped_headers"]


def _known_here(task_id: str) -> bool:
    return task_id in worker_state.requests  # reserved or running on this worker


def _is_queued(task_id: str) -> bool:
    with session_scope() as session:
        job = session.get(Job, task_id)
        return job is not None and job.status == JobStatus.PENDING


def cancel_for_revoke(state: Any, task_ids: list[str], reason: str | None, message: str | None,
                      forced: bool) -> list[str]:
    """Cancel the tokens of the revoked jobs this worker runs (or that are still queued anywhere).

    Every worker receives a revoke broadcast; only the one running the job records the request, so
    one click is one ``cancel_requested`` event.
    """
    try:
        why = CancellationReason(reason or CancellationReason.USER_REQUESTED)
    except ValueError:
        log.warning("revoke with unknown reason %r: using user_requested", reason)
        why = CancellationReason.USER_REQUESTED
    text = message or ("terminate requested: cooperative stop, then a signal" if forced else "revoke requested")
    cancelled = []
    for task_id in task_ids:
        try:
            if _known_here(task_id) or _is_queued(task_id):
                request_cancel(task_id, why, text, CancellationSource.REVOKE, actor=state.hostname)
                cancelled.append(task_id)
        except AndonError:
            pass  # not an andon job, or it just ended: Celery's own revoke still applies
        except Exception:
            log.exception("andon: could not cancel %s on revoke", task_id)
    return cancelled


def revoke(state, task_id, terminate=False, signal=None, reason=None, message=None, grace=None, **kwargs):
    """Revoke a task by id: cancel its andon token, and (terminate) signal it after a grace period."""
    task_ids = list(maybe_list(task_id) or [])
    cancel_for_revoke(state, task_ids, reason, message, forced=bool(terminate))
    if not terminate:
        return _celery_revoke(state, task_ids, terminate=False, signal=signal, **kwargs)
    grace_s = float(grace if grace is not None else get_settings().terminate_grace_s)
    reply = _celery_revoke(state, task_ids, terminate=False, signal=signal, **kwargs)
    state.consumer.timer.call_after(grace_s, _celery_revoke, (state, task_ids),
                                    {"terminate": True, "signal": signal})
    log.info("andon: %s will be signalled in %.1fs unless it stops first", task_ids, grace_s)
    if isinstance(reply, dict):
        return reply
    return ok(f"tasks {', '.join(task_ids)} cancelled; signal in {grace_s:g}s if still running")


def terminate(state, signal, task_id, **kwargs):
    """Terminate by id (``celery control terminate``): the same graceful path as revoke+terminate."""
    return revoke(state, task_id, terminate=True, signal=signal, **kwargs)


def revoke_by_stamped_headers(state, headers, terminate=False, signal=None, **kwargs):
    """Revoke by stamp: cancel the tokens of active jobs whose stamps match, then let Celery act."""
    wanted = headers if isinstance(headers, dict) else {h.split("=")[0]: h.split("=")[1] for h in headers}
    matching = [
        req.id for req in list(worker_state.active_requests)
        if any(set(maybe_list(req.stamps.get(key) or [])) & set(maybe_list(value))
               for key, value in wanted.items() if getattr(req, "stamps", None))
    ]
    cancel_for_revoke(state, matching, kwargs.get("reason"), kwargs.get("message"), forced=bool(terminate))
    if terminate and matching:
        grace_s = float(kwargs.get("grace") or get_settings().terminate_grace_s)
        state.consumer.timer.call_after(grace_s, _celery_revoke_by_stamped_headers, (state, headers),
                                        {"terminate": True, "signal": signal})
        return _celery_revoke_by_stamped_headers(state, headers, terminate=False, signal=signal)
    return _celery_revoke_by_stamped_headers(state, headers, terminate=terminate, signal=signal)


def install_control_commands() -> None:
    """Put andon's revoke, terminate and revoke_by_stamped_headers in place of Celery's (the
    originals are kept above and still run after andon's cancel)."""
    control_command(variadic="task_id", signature="[id1 [id2 [... [idN]]]]")(revoke)
    control_command(variadic="task_id", args=[("signal", str)],
                    signature="<signal> [id1 [id2 [... [idN]]]]")(terminate)
    control_command(variadic="headers",
                    signature="[key1=value1 [key2=value2 [... [keyN=valueN]]]]")(revoke_by_stamped_headers)
