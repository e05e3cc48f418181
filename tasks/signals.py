"""Worker signal wiring: what a worker process does at the moments Celery tells it about."""

from __future__ import annotations

from celery.signals import worker_process_init

from tasks.store import reset_process_state


@worker_process_init.connect
def after_child_fork(**_: object) -> None:
    """A prefork child must not share its parent's Redis sockets or watcher thread."""
    reset_process_state()
