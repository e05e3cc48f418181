"""What the broker holds for andon's jobs, where it can be inspected (kombu's Redis transport).

Two faults leave a job's message in the wrong place, and neither shows in the job row:

* **lost** — a queued job whose message the broker no longer has (a queue flushed, Redis without
  persistence restarted, the last second of AOF before a crash): the row would stay ``pending``
  forever. The reaper sends it again (:func:`resend_lost`).
* **parked** — a message delivered to a worker and never acked (the ack was lost in a broker blip):
  it sits in kombu's ``unacked`` hash until the visibility timeout (hours) although its job ended.
  The reaper acks it and writes the result backend's state if it has none (:func:`release_parked`).

On Redis the queues are lists of kombu JSON messages (``headers.id`` is the job id) and the
unacked hash maps a delivery tag to ``[message, exchange, routing_key]``. Where the broker can't be
inspected (RabbitMQ), queued jobs are re-sent by age only: one owner per job makes a duplicate harmless.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime, timedelta

import redis
from sqlalchemy import select

from db import jobs as job_rows
from db.models import Job, JobEvent
from db.session import session_scope
from db.settings import get_settings
from db.vocabulary import EventKind, JobStatus
from tasks.celery_app import app
from tasks.results import needs_settling, settle_result
from tasks.sending import enqueue

__all__ = ["release_parked", "resend_lost"]

log = logging.getLogger(__name__)

UNACKED, UNACKED_INDEX = "unacked", "unacked_index"
#: kombu's Redis priority steps (its default): a queue's messages live in ``queue`` and ``queue\x06\x16N``.
PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


def _broker() -> redis.Redis | None:
    url = get_settings().resolved_broker_url
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return None
    return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=10)


def _message_id(raw: bytes | str) -> str | None:
    try:
        message = json.loads(raw)
        if isinstance(message, list):  # an unacked entry: [message, exchange, routing_key]
            message = message[0]
        return message.get("headers", {}).get("id") or message.get("properties", {}).get("correlation_id")
    except (ValueError, AttributeError, IndexError, TypeError):
        return None


def resend_lost(older_than_s: float, uninspectable_after_s: float, actor: str = "reaper") -> list[str]:
    """Send again every queued job whose message is gone; returns their ids.

    Only jobs queued (not waiting for a parent) for longer than ``older_than_s`` since they were
    submitted or last sent are looked at. On Redis a job is re-sent only if no queue and no unacked
    entry holds its message; elsewhere, once it has waited ``uninspectable_after_s``."""
    broker = _broker()
    wait_s = older_than_s if broker is not None else uninspectable_after_s
    cutoff = datetime.now(UTC) - timedelta(seconds=wait_s)
    last_sent = (select(JobEvent.job_id).where(
        JobEvent.kind.in_([EventKind.RESENT.value, EventKind.REQUEUED.value]),
        JobEvent.at >= cutoff))
    with session_scope() as session:
        stale = session.execute(select(Job.id, Job.queue, Job.options).where(
            Job.status == JobStatus.PENDING.value, Job.deferred.is_(False), Job.created_at < cutoff,
            Job.id.not_in(last_sent)).limit(10_000)).all()
    if not stale:
        return []
    if broker is not None:
        present = _ids_held(broker, {queue or app.conf.task_default_queue for _, queue, _ in stale},
                            unacked_since=time.time() - get_settings().parked_after_s)
        stale = [row for row in stale if row[0] not in present]
    resent = []
    for job_id, queue, options in stale:
        with session_scope() as session:
            job_rows.add_event(session, job_id, EventKind.RESENT, actor=actor,
                               detail={"why": "its message was not in the broker" if broker else "queued too long"})
        enqueue(job_id, options, queue)
        resent.append(job_id)
    return resent


def _ids_held(broker: redis.Redis, queues: set[str], unacked_since: float) -> set[str]:
    """Job ids whose message is in a queue, or delivered (unacked) since ``unacked_since``: one
    unacked for longer belongs to a worker that died or lost its ack, and counts as lost."""
    held: set[str] = set()
    for queue in queues:
        for suffix in PRIORITY_SUFFIXES:
            held.update(filter(None, map(_message_id, broker.lrange(queue + suffix, 0, -1))))
    recent = broker.zrangebyscore(UNACKED_INDEX, unacked_since, "+inf")
    if recent:
        held.update(filter(None, map(_message_id, filter(None, broker.hmget(UNACKED, recent)))))
    return held


def release_parked(older_than_s: float) -> list[str]:
    """Settle the delivered-but-unacked messages of jobs that have ended (parked for longer than
    ``older_than_s``): the result backend's state is written where it has none, and the message goes
    back to its queue — as kombu restores a message on Redis — rather than being acked here. A worker
    then takes it, finds the job ended and acks it; so a message a busy worker still holds (prefetched,
    not parked) is never lost, and a duplicate is harmless. Returns the job ids."""
    broker = _broker()
    if broker is None:
        return []
    parked_since = time.time() - older_than_s
    tags = broker.zrangebyscore(UNACKED_INDEX, "-inf", parked_since)
    if not tags:
        return []
    entries = dict(zip(tags, broker.hmget(UNACKED, tags)))
    by_job = {job_id: tag for tag, raw in entries.items() if raw and (job_id := _message_id(raw))}
    if not by_job:
        return []
    with session_scope() as session:
        ended = {job.id: job for job in session.scalars(select(Job).where(
            Job.id.in_(list(by_job)), Job.status.in_([s.value for s in (JobStatus.CANCELLED, JobStatus.COMPLETED,
                                                                        JobStatus.FAILED)])))}
        for job in ended.values():
            session.expunge(job)
    released = []
    for job_id, job in ended.items():
        tag = by_job[job_id]
        if needs_settling(job.status, app.backend.get_task_meta(job_id, cache=False)):
            settle_result(job)  # first: whoever sees the message move sees the job's state written
        _restore(broker, tag, entries[tag])
        released.append(job_id)
    return released


def _restore(broker: redis.Redis, tag: bytes, raw: bytes) -> None:
    """What kombu's ``restore_by_tag`` does: the message back on its queue, out of the unacked hash,
    in one transaction (so it is in exactly one of the two)."""
    try:
        message, _exchange, routing_key = json.loads(raw)
    except (ValueError, TypeError):
        return
    with broker.pipeline() as pipe:
        pipe.zrem(UNACKED_INDEX, tag).hdel(UNACKED, tag).lpush(routing_key, json.dumps(message)).execute()
