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
    with app.producer_or_acquire() as producer:
        # the message and its task-sent event in one round trip (kombu's publish batch; other
        # transports publish at once, as send_task does)
        with producer.connection._reraise_as_library_errors(), producer.batch(max_size=16):
            _publish(producer, *_message(job_id, options or {}, queue))


def job_signature(job_id: str, options: dict[str, Any], queue: str | None):
    """The pipeline task for one job row, as a Celery signature (chains and chords)."""
    return app.signature(RUN_PIPELINE, args=[job_id], immutable=True).set(task_id=job_id,
                                                                          **task_routing(options, queue))


def task_routing(options: dict, queue: str | None) -> dict:
    """How a job's message is sent: its queue and its Celery time limits (only those that are set)."""
    routing = {"queue": queue, "time_limit": options.get("time_limit_s"),
               "soft_time_limit": options.get("soft_time_limit_s")}
    return {key: value for key, value in routing.items() if value is not None}


def _message(job_id: str, options: dict, queue: str | None) -> tuple[Any, dict]:
    """Celery's message for a job and its route, as ``app.send_task(RUN_PIPELINE, args=[job_id],
    task_id=job_id, **task_routing(options, queue))`` makes them (celery/app/base.py ``send_task``),
    less what ``send_task`` adds for a caller that waits on the result: the Redis result backend's
    ``on_task_call`` subscribes to the job's result channel, and the ``AsyncResult`` it returns
    unsubscribes when collected. Nothing in andon waits on a job's Celery result, and those are two
    Redis round trips per job. tests/test_sending.py holds the messages side by side."""
    amqp = app.amqp
    routing = task_routing(options, queue)
    time_limit, soft_time_limit = routing.pop("time_limit", None), routing.pop("soft_time_limit", None)
    task_type = app.tasks.get(RUN_PIPELINE)
    defaults = {k: v for k, v in task_type._get_exec_options().items() if v is not None} if task_type else {}
    for name in ("time_limit", "soft_time_limit", "expires"):
        defaults.pop(name, None)
    route = amqp.router.route(dict(defaults, **routing), RUN_PIPELINE, [job_id], None, task_type)
    parent = app.current_worker_task  # a worker enqueuing a child: the same root and parent ids as Celery's
    root_id = parent_id = None
    if parent:
        root_id, parent_id = parent.request.root_id or parent.request.id, parent.request.id
    message = amqp.create_task_message(
        job_id, RUN_PIPELINE, [job_id], None, reply_to=app.thread_oid, time_limit=time_limit,
        soft_time_limit=soft_time_limit, create_sent_event=app.conf.task_send_sent_event,
        root_id=root_id, parent_id=parent_id, ignore_result=None, **route)
    return message, route


def _publish(producer, message: Any, route: dict, declare: list | None = None) -> None:
    """Send one message as ``send_task`` does (``before_task_publish``, the ``task-sent`` event...).
    ``declare``: ``[]`` once this producer has declared the queue."""
    app.amqp.send_task_message(producer, RUN_PIPELINE, message,
                               **(route if declare is None else {**route, "declare": declare}))


#: The job id a batch's message templates are made with (a uuid4 no job gets: its random bits are 0).
_TEMPLATE_ID = "00000000-0000-4000-8000-000000000000"


class _Templates:
    """The messages of many jobs: Celery makes one per routing (queue and time limits), and each
    job's is a copy with its id put in every place the template's id is — a third of a batch's
    enqueue CPU otherwise goes to Celery making (and ``saferepr``-ing) messages that differ only there."""

    def __init__(self) -> None:
        self._made: dict[tuple, tuple[Any, dict, list]] = {}

    def message(self, job_id: str, options: dict, queue: str | None) -> tuple[Any, dict]:
        key = tuple(sorted(task_routing(options, queue).items()))
        made = self._made.get(key)
        if made is None:
            template, route = _message(_TEMPLATE_ID, options, queue)
            # per part of the message: the keys whose values carry the id (the rest is shared, unchanged)
            made = self._made[key] = template, route, [[k for k, v in part.items() if _has_id(v)]
                                                       if isinstance(part, dict) else None for part in template]
        template, route, id_keys = made
        return type(template)(*(_dict_with_id(part, keys, job_id) if keys is not None else _with_id(part, job_id)
                                for part, keys in zip(template, id_keys))), route


def _has_id(value: Any) -> bool:
    return _with_id(value, "") != value


def _dict_with_id(part: dict, keys: list, job_id: str) -> dict:
    copy = dict(part)  # send_task_message updates headers, properties and the event in place
    for key in keys:
        copy[key] = _with_id(part[key], job_id)
    return copy


def _with_id(value: Any, job_id: str) -> Any:
    """A copy of ``value`` with ``_TEMPLATE_ID`` replaced by ``job_id`` wherever it occurs."""
    if isinstance(value, str):
        return value.replace(_TEMPLATE_ID, job_id) if _TEMPLATE_ID in value else value
    if isinstance(value, dict):
        return {key: _with_id(item, job_id) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_with_id(item, job_id) for item in value)
    return value


#: Jobs whose messages go to the broker in one round trip (kombu's publish batch: a Redis pipeline).
ENQUEUE_CHUNK = 500


def enqueue_many(jobs: list[tuple[str, dict | None, str | None]], sent: list[str]) -> None:
    """Send the pipeline task for many committed rows (``(job_id, options, queue)``) through one
    producer, ``ENQUEUE_CHUNK`` jobs per broker round trip: kombu's ``Producer.batch()`` buffers each
    message and its ``task-sent`` event in a Redis pipeline (other transports publish one by one, as
    ``send_task`` always does). The messages are made from templates (:class:`_Templates`); each
    queue is declared with its first message only. A chunk's ids are
    appended to ``sent`` once it is flushed; after a broker error, the jobs not in ``sent`` may have
    no message (a message of theirs that got through anyway finds the row the caller ends, and is
    skipped)."""
    declared: set[str | None] = set()
    templates = _Templates()
    with app.producer_or_acquire() as producer:
        # Buffered publishes touch no socket once their queue is declared, so kombu's retry wrapper
        # (connection.ensure) has nothing to retry there — a fifth of the CPU per message. The
        # flush is never retried (kombu/transport/redis.py: delivery would be uncertain); a broker
        # error there fails the chunk. Unbuffered transports keep Celery's retry on every message.
        buffered = producer.supports_batch_publish
        with producer.connection._reraise_as_library_errors():
            for start in range(0, len(jobs), ENQUEUE_CHUNK):
                chunk = jobs[start:start + ENQUEUE_CHUNK]
                # room for every command of the chunk: flushed once, when the block exits
                with producer.batch(max_size=4 * len(chunk) + 16):
                    for job_id, options, queue in chunk:
                        message, route = templates.message(job_id, options or {}, queue)
                        if queue not in declared:
                            _publish(producer, message, route)
                            declared.add(queue)
                        else:
                            _publish(producer, message, {**route, "retry": False} if buffered else route, [])
                sent.extend(job_id for job_id, _, _ in chunk)
