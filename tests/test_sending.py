"""A job's message is the one ``app.send_task`` would send, whichever door sends it."""

from __future__ import annotations

import uuid

import pytest
from celery.signals import before_task_publish

from tasks.celery_app import RUN_PIPELINE, app
from tasks.sending import enqueue, enqueue_many, task_routing

#: What differs between two messages of two jobs: the ids, and where and when they were made.
_PER_JOB = {"id", "root_id", "argsrepr"}


@pytest.fixture
def published():
    """Every message this process publishes: (routing, headers, properties, body), in order."""
    seen: list[tuple] = []

    def record(sender, body, exchange, routing_key, headers, properties, declare, **_):
        seen.append(({"exchange": exchange, "routing_key": routing_key, "sender": sender,
                      "declare": [q.name for q in declare or []]},
                     dict(headers), dict(properties), body))

    before_task_publish.connect(record, weak=False)
    yield seen
    before_task_publish.disconnect(record)


def _same_but_ids(reference: tuple, ours: tuple, job_id: str, ref_id: str) -> None:
    (r_route, r_headers, r_props, r_body), (o_route, o_headers, o_props, o_body) = reference, ours
    assert o_route["exchange"] == r_route["exchange"] and o_route["routing_key"] == r_route["routing_key"]
    assert o_route["sender"] == r_route["sender"] == RUN_PIPELINE
    assert {k: v for k, v in o_headers.items() if k not in _PER_JOB} == \
        {k: v for k, v in r_headers.items() if k not in _PER_JOB}
    assert (o_headers["id"], o_headers["root_id"], o_headers["argsrepr"]) == (job_id, job_id, repr([job_id]))
    assert r_headers["id"] == ref_id
    assert {k: v for k, v in o_props.items() if k != "correlation_id"} == \
        {k: v for k, v in r_props.items() if k != "correlation_id"}
    assert o_props["correlation_id"] == job_id
    assert o_body == ([job_id], {}, r_body[2]) and r_body[0] == [ref_id]


@pytest.mark.parametrize("options, queue", [({}, None), ({"time_limit_s": 30, "soft_time_limit_s": 20}, "q-send"),
                                            ({"stage_delay_s": 0.1}, "q-send-2")])
def test_enqueue_and_enqueue_many_publish_what_send_task_publishes(redis_server, published, options, queue):
    ref_id, one, many = (str(uuid.uuid4()) for _ in range(3))
    app.send_task(RUN_PIPELINE, args=[ref_id], task_id=ref_id, **task_routing(options, queue))
    enqueue(one, options, queue)
    sent: list[str] = []
    enqueue_many([(many, options, queue)], sent)
    assert sent == [many] and len(published) == 3
    reference, single, batched = published
    _same_but_ids(reference, single, one, ref_id)
    _same_but_ids(reference, batched, many, ref_id)
    assert single[0]["declare"] == batched[0]["declare"] == reference[0]["declare"]
    _drain(queue)


def test_enqueue_many_declares_each_queue_once_and_sends_every_job_in_order(redis_server, published):
    from tasks.process import get_redis

    jobs = [(str(uuid.uuid4()), {}, "q-many-a" if i % 3 else "q-many-b") for i in range(1203)]
    sent: list[str] = []
    enqueue_many(jobs, sent)
    assert sent == [job_id for job_id, _, _ in jobs]
    assert [headers["id"] for _, headers, _, _ in published] == sent
    assert [route["declare"] for route, *_ in published if route["declare"]] == [["q-many-b"], ["q-many-a"]]
    assert get_redis().llen("q-many-a") + get_redis().llen("q-many-b") == len(jobs)
    _drain("q-many-a", "q-many-b")


def _drain(*queues: str | None) -> None:
    from tasks.process import get_redis

    get_redis().delete(*(q or app.conf.task_default_queue for q in queues))


def test_a_batch_whose_broker_is_away_leaves_no_job_pending(database):
    """The rows commit before any message is sent; when the broker can't take them, every job whose
    message didn't go ends ``failed`` with the reason — none stays ``pending`` with no message."""
    import os
    import subprocess
    import sys

    from sqlalchemy import select

    from api.supervisor import free_port
    from db import jobs as job_rows
    from db.models import Job
    from db.session import session_scope

    tag = f"broker-away-{uuid.uuid4().hex[:8]}"
    code = ("import json, sys\n"
            "from api import service\n"
            "from api.schemas import SubmitRequest\n"
            "from tasks.errors import BrokerUnavailable\n"
            f"bodies = [SubmitRequest(documents=['One.'], tags=[{tag!r}]) for _ in range(30)]\n"
            "try:\n"
            "    service.submit_batch(bodies)\n"
            "except BrokerUnavailable as exc:\n"
            "    print('unavailable:', exc)\n")
    env = {**os.environ, "ANDON_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}  # nothing listens there
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "unavailable: could not enqueue 30 of 30 jobs" in done.stdout, done.stdout + done.stderr
    with session_scope() as session:
        rows = session.execute(select(Job.status, Job.error).where(job_rows.tagged(tag))).all()
    assert len(rows) == 30
    assert {status for status, _ in rows} == {"failed"}
    assert all(error.startswith("could not enqueue") for _, error in rows)
