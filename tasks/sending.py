"""Sending a job's message: one place decides its task, queue and Celery time limits.

Every door that queues a job (submit, resume, a parent completing, a lost message re-sent, a chain
or chord) goes through here, after the job's row is committed: the worker must find the row.
"""

from __future__ import annotations

from typing import Any

from tasks.celery_app import RUN_PIPELINE, app

__all__ = ["enqueue", "job_signature", "task_routing"]


def enqueue(job_id: str, options: dict | None = None, queue: str | None = None) -> None:
    """Send the pipeline task for a job whose row is committed (the worker must find it)."""
    app.send_task(RUN_PIPELINE, args=[job_id], task_id=job_id, **task_routing(options or {}, queue))


def job_signature(job_id: str, options: dict[str, Any], queue: str | None):
    """The pipeline task for one job row, as a Celery signature (chains and chords)."""
    return app.signature(RUN_PIPELINE, args=[job_id], immutable=True).set(task_id=job_id,
                                                                          **task_routing(options, queue))


def task_routing(options: dict, queue: str | None) -> dict:
    """How a job's message is sent: its queue and its Celery time limits (only those that are set)."""
    routing = {"queue": queue, "time_limit": options.get("time_limit_s"),
               "soft_time_limit": options.get("soft_time_limit_s")}
    return {key: value for key, value in routing.items() if value is not None}
