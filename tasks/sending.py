"""Sending a job's message: one place decides its task, queue and Celery time limits.

Every door that queues a job (submit, resume, a parent completing, a lost message re-sent, a chain
or chord) goes through here, after the job's row is committed: the worker must find the row.
"""

from __future__ import annotations

from typing import Any

from tasks.celery_app import RUN_PIPELINE, app

__all__ = ["ENQUEUE_CHUNK", "enqueue", "enqueue_many", "job_signature", "task_routing"]


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


#: Jobs whose messages go to the broker in one round trip (kombu's publish batch: a Redis pipeline).
ENQUEUE_CHUNK = 500


def enqueue_many(jobs: list[tuple[str, dict | None, str | None]], sent: list[str]) -> None:
    """Send the pipeline task for many committed rows (``(job_id, options, queue)``) through one
    producer, ``ENQUEUE_CHUNK`` jobs per broker round trip: kombu's ``Producer.batch()`` buffers each
    message and its ``task-sent`` event in a Redis pipeline (other transports publish one by one, as
    ``send_task`` always does). A chunk's ids are appended to ``sent`` once it is flushed; after a
    broker error, the jobs not in ``sent`` may have no message (a message of theirs that got through
    anyway finds the row the caller ends, and is skipped)."""
    with app.producer_or_acquire() as producer:
        for start in range(0, len(jobs), ENQUEUE_CHUNK):
            chunk = jobs[start:start + ENQUEUE_CHUNK]
            # room for every command of the chunk: flushed once, when the block exits
            with producer.batch(max_size=4 * len(chunk) + 16):
                for job_id, options, queue in chunk:
                    app.send_task(RUN_PIPELINE, args=[job_id], task_id=job_id, producer=producer,
                                  **task_routing(options or {}, queue))
            sent.extend(job_id for job_id, _, _ in chunk)
