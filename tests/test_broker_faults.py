"""Messages the broker loses or parks (issue 11 items 8 and 9), on the real Redis broker: a queued job
whose message is gone is sent again, and a delivered-but-never-acked message of an ended job goes back
to its queue with the result backend's state written (a worker then acks it). Faults are made the way they happen: the message removed
from its queue, or left in kombu's unacked hash as a lost ack leaves it."""

from __future__ import annotations

import json
import time
import uuid

from celery.result import AsyncResult

from api import service
from tasks.app import app
from tasks.broker import UNACKED, UNACKED_INDEX
from tests.jobs_helpers import events, is_terminal, job_row, while_sweeping
from tests.procs import wait_for

# A delivered message counts as held for PARKED_AFTER_S: short enough for the parked test, long enough
# that a loaded box's delivery-to-start of the re-sent message is never taken for a second loss.
FAST_SWEEP = {"ANDON_HEARTBEAT_S": "0.3", "ANDON_BROKER_SWEEP_S": "0.5", "ANDON_LOST_MESSAGE_AFTER_S": "0.5",
              "ANDON_PARKED_AFTER_S": "15"}


def take_message(redis_client, queue: str, job_id: str) -> bytes:
    raw = wait_for(lambda: next((m for m in redis_client.lrange(queue, 0, -1) if job_id.encode() in m), None), 10,
                   what=f"the message of {job_id} in {queue}")
    assert redis_client.lrem(queue, 0, raw) == 1
    return raw


def test_a_queued_job_whose_message_was_lost_is_sent_again(start_worker, redis_client):
    queue = f"q-lost-{uuid.uuid4().hex[:8]}"
    job_id = service.submit_job(["a", "b"], pipeline="user-sync", queue=queue).job_id
    take_message(redis_client, queue, job_id)  # the broker loses it: the row still says pending
    time.sleep(0.6)
    start_worker(concurrency=1, queue=queue, **FAST_SWEEP)
    while_sweeping(lambda: is_terminal(job_id), 90, what="the job sent again to end")
    assert job_row(job_id).status == "completed"
    assert [e.kind for e in events(job_id)].count("resent") == 1


def test_a_queued_job_whose_message_is_there_is_not_sent_twice(start_worker, redis_client):
    queue = f"q-held-{uuid.uuid4().hex[:8]}"
    job_id = service.submit_job(["a"], pipeline="user-sync", queue=queue).job_id
    start_worker(concurrency=1, queue=f"q-other-{uuid.uuid4().hex[:8]}", **FAST_SWEEP)  # sweeps, doesn't serve it
    until = time.monotonic() + 3
    while_sweeping(lambda: time.monotonic() > until, 10, what="three seconds of sweeps")
    assert job_row(job_id).status == "pending" and "resent" not in [e.kind for e in events(job_id)]
    assert redis_client.llen(queue) == 1


def test_a_parked_message_of_an_ended_job_is_acked_and_its_state_written(start_worker, redis_client):
    queue = f"q-parked-{uuid.uuid4().hex[:8]}"
    job_id = service.submit_job(["a"], pipeline="user-sync", queue=queue).job_id
    raw = take_message(redis_client, queue, job_id)
    tag = str(uuid.uuid4())  # delivered to a worker whose ack never reached the broker
    redis_client.hset(UNACKED, tag, json.dumps([json.loads(raw), "", queue]))
    redis_client.zadd(UNACKED_INDEX, {tag: time.time() - 60})  # parked for longer than PARKED_AFTER_S
    assert service.cancel_job(job_id).status.value == "cancelled"
    assert AsyncResult(job_id, app=app).state == "PENDING"
    start_worker(concurrency=1, queue=f"q-other-{uuid.uuid4().hex[:8]}", **FAST_SWEEP)
    while_sweeping(lambda: not redis_client.hexists(UNACKED, tag), 60, what="the parked message to be released")
    assert redis_client.zscore(UNACKED_INDEX, tag) is None
    assert AsyncResult(job_id, app=app).state == "REVOKED"
    # back on its queue, never lost: a worker serving it takes it, finds the job ended, and acks it
    assert any(job_id.encode() in m for m in redis_client.lrange(queue, 0, -1))
    start_worker(concurrency=1, queue=queue)
    wait_for(lambda: redis_client.llen(queue) == 0, 60, what="the worker to take the restored message")
    wait_for(lambda: AsyncResult(job_id, app=app).state == "REVOKED" and not any(
        job_id.encode() in held for held in redis_client.hvals(UNACKED)), 30,
             what="the worker to settle it")  # the queued cancel stays the job's end; nothing is left parked
    assert job_row(job_id).started_at is None
