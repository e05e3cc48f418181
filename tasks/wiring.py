"""Installing andon into a Celery app, in one place and one step: its tasks, what the worker does at
each moment Celery signals, the remote-control commands that make revoke stop running jobs, and the
request class that finalizes jobs whose process died. Nothing here happens as a side effect of an
import: :mod:`tasks.app` calls :func:`install`.
"""

from __future__ import annotations

import logging
import os
import sys

from celery import Celery, signals

from tasks import jobs, notify, policy, registry, transport, webhooks
from tasks import signals as moments
from tasks.celery_app import ANALYZE_DOCUMENTS, RUN_PIPELINE
from tasks.errors import PipelineError
from tasks.revoke import install_control_commands

__all__ = ["install"]

log = logging.getLogger(__name__)
_installed: set[int] = set()


def install(app: Celery) -> None:
    """Register andon's tasks on ``app`` and connect its worker hooks (once per app)."""
    if id(app) in _installed:
        return
    _installed.add(id(app))
    andon_tasks = [app.task(name=RUN_PIPELINE, bind=True, base=jobs.PipelineTask)(jobs.run_pipeline),
                   app.task(name=ANALYZE_DOCUMENTS, bind=True, base=jobs.PipelineTask)(jobs.analyze_documents)]
    webhooks.install(app)  # its own task and time limit: a slow receiver never holds a job's slot long
    install_control_commands()
    transport.install()  # a worker survives its Redis broker restarting mid-job (celery/kombu#970)
    notify.install()  # every job event and item row this worker commits wakes the API's event streams
    signals.worker_init.connect(load_pipelines_or_exit, weak=False)
    signals.worker_init.connect(moments.before_pool_starts, weak=False)
    signals.worker_process_init.connect(moments.after_child_fork, weak=False)
    signals.worker_ready.connect(moments.after_worker_ready, weak=False)
    signals.worker_shutting_down.connect(moments.on_worker_shutting_down, weak=False)
    for task in andon_tasks:  # only andon's jobs: other tasks on the same app are none of our business
        signals.task_revoked.connect(moments.on_task_revoked, sender=task, weak=False)


def load_pipelines_or_exit(**_: object) -> None:
    """Before the pool forks: import every pipeline (the children inherit them), or stop the worker
    with one clear line — a bad ``ANDON_PIPELINES`` must fail at start, not at the first job."""
    try:
        known = registry.load_configured()
        policy.check_global()
    except PipelineError as exc:
        sys.stderr.write(f"andon worker: {exc}\n")
        sys.stderr.flush()
        os._exit(2)
    log.info("andon: pipelines %s", ", ".join(known))
