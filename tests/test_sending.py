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


# --- Redis: a batch's messages written straight to a pipeline ------------------------------------


@pytest.fixture
def kombu_path():
    """While active, ``enqueue_many`` takes kombu's publish path: a ``before_task_publish`` receiver
    must see every message, so the pipelined path steps aside."""
    def nothing(**_):
        pass

    before_task_publish.connect(nothing, weak=False)
    yield
    before_task_publish.disconnect(nothing)


def _lpushed(queue: str) -> list[str]:
    """The raw payloads on a queue's list (kombu's default priority), oldest first, then dropped."""
    from tasks.process import get_redis

    raw = [p.decode() for p in reversed(get_redis().lrange(queue, 0, -1))]
    get_redis().delete(queue)
    return raw


def _untagged(payload: str) -> str:
    """The payload with its random delivery tag out: the one byte range two puts may differ in."""
    import json

    return payload.replace(json.loads(payload)["properties"]["delivery_tag"], "<tag>")


@pytest.mark.parametrize("options, queue", [({}, "q-pipe-1"), ({"time_limit_s": 30, "soft_time_limit_s": 20}, "q-pipe-2")])
def test_a_pipelined_message_is_byte_for_byte_kombus(redis_server, request, options, queue):
    job_id = str(uuid.uuid4())
    enqueue_many([(job_id, options, queue)], [])
    pipelined, = _lpushed(queue)
    request.getfixturevalue("kombu_path")
    enqueue_many([(job_id, options, queue)], [])
    kombus, = _lpushed(queue)
    assert _untagged(pipelined) == _untagged(kombus)
    assert job_id in pipelined and "00000000-0000-4000-8000" not in pipelined


def test_a_single_enqueue_from_a_cached_template_is_byte_for_byte_kombus(redis_server, request):
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    enqueue(first, {}, "q-pipe-one")  # captures this routing's template
    enqueue(second, {}, "q-pipe-one")  # from the cache
    pipelined = _lpushed("q-pipe-one")
    request.getfixturevalue("kombu_path")
    enqueue(first, {}, "q-pipe-one")
    enqueue(second, {}, "q-pipe-one")
    kombus = _lpushed("q-pipe-one")
    assert [_untagged(p) for p in pipelined] == [_untagged(k) for k in kombus]
    assert len(pipelined) == 2 and second in pipelined[1] and first not in pipelined[1]


def test_a_pipelined_task_sent_event_is_kombus_but_its_clock_and_time(redis_server, request):
    import base64
    import json

    from tasks.process import get_redis

    def sent_event(job_id: str) -> tuple[dict, dict]:
        with get_redis().pubsub() as sub:
            sub.psubscribe("*celeryev*")
            wait_message(sub, "psubscribe")
            enqueue_many([(job_id, {}, "q-pipe-ev")], [])
            envelope = json.loads(wait_message(sub, "pmessage")["data"])
        _lpushed("q-pipe-ev")
        event = json.loads(base64.b64decode(envelope.pop("body")))
        envelope["properties"].pop("delivery_tag")
        return envelope, event

    job_id = str(uuid.uuid4())
    pipelined = sent_event(job_id)
    request.getfixturevalue("kombu_path")
    kombus = sent_event(job_id)
    assert pipelined[0] == kombus[0]
    (p_event, k_event) = pipelined[1], kombus[1]
    assert list(p_event) == list(k_event)  # the same keys in the same order
    assert p_event["type"] == "task-sent" and p_event["uuid"] == job_id and p_event["queue"] == "q-pipe-ev"
    assert {k: v for k, v in p_event.items() if k not in ("clock", "timestamp")} == \
        {k: v for k, v in k_event.items() if k not in ("clock", "timestamp")}
    assert p_event["clock"] < k_event["clock"] and p_event["timestamp"] <= k_event["timestamp"]


def wait_message(sub, kind: str, timeout: float = 5.0) -> dict:
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        message = sub.get_message(timeout=0.2)
        if message and message["type"] == kind:
            return message
    raise AssertionError(f"no {kind} within {timeout} s")


def test_pipelined_jobs_land_on_their_own_queues_in_order(redis_server):
    jobs = [(str(uuid.uuid4()), {"time_limit_s": 60} if i % 2 else {}, f"q-pipe-{i % 3}") for i in range(1207)]
    sent: list[str] = []
    enqueue_many(jobs, sent)
    assert sent == [job_id for job_id, _, _ in jobs]
    for queue in ("q-pipe-0", "q-pipe-1", "q-pipe-2"):
        import json

        ids = [json.loads(p)["headers"]["id"] for p in _lpushed(queue)]
        assert ids == [job_id for job_id, _, q in jobs if q == queue]


def test_a_priority_lands_where_kombu_puts_it(redis_server):
    """kombu's Redis priorities live in ``queue\\x06\\x16N`` lists: the captured template says where."""
    from kombu.transport.redis import Channel

    from tasks.process import get_redis
    from tasks.sending import _message, _RedisTemplate

    job_id, queue = str(uuid.uuid4()), "q-pipe-pri"
    with app.producer_or_acquire() as producer:
        assert isinstance(producer.channel, Channel)
        message, route = _message(job_id, {}, queue)
        template = _RedisTemplate.capture(producer, message, {**route, "priority": 5})
        kombu_message, _ = _message(job_id, {}, queue)
        app.amqp.send_task_message(producer, RUN_PIPELINE, kombu_message, **route, priority=5)
    key = f"{queue}\x06\x163"  # kombu's steps 0, 3, 6, 9: 5 goes to 3
    assert template.key == key and get_redis().llen(key) == 1 and get_redis().llen(queue) == 0
    assert _untagged(template.payload) == _untagged(get_redis().lpop(key).decode())


def test_on_redis_a_batch_takes_the_pipelined_path_unless_a_publish_signal_is_heard(redis_server, request):
    from tasks.sending import _redis_templates, _Templates

    jobs = [(str(uuid.uuid4()), {}, None)]
    with app.producer_or_acquire() as producer:
        assert _redis_templates(producer, jobs, _Templates()) is not None
        request.getfixturevalue("kombu_path")
        assert _redis_templates(producer, jobs, _Templates()) is None


def test_jobs_of_a_pipelined_batch_run_to_completion(api_client):
    from tasks.sending import _redis_templates, _Templates
    from tests.jobs_helpers import docs, wait_terminal

    with app.producer_or_acquire() as producer:  # the API's path, here: no publish signal heard
        assert _redis_templates(producer, [(str(uuid.uuid4()), {}, None)], _Templates()) is not None

    answer = api_client.post("/api/jobs/batch", json={"jobs": [{"documents": docs(2)} for _ in range(12)]})
    assert answer.status_code == 202, answer.text
    for job_id in answer.json()["job_ids"]:
        job = wait_terminal(job_id, timeout=60)
        assert (job.status, job.completed_items) == ("completed", 2), job.error


def test_a_channel_keeps_its_redis_client_until_its_pool_changes(redis_server):
    """kombu makes a ``redis.Redis`` per publish (0.2 ms of set-up each); the pipelined path keeps
    one per channel — and makes a new one once kombu has dropped the channel's pool (as after a fork)."""
    import json

    from tasks.sending import _CLIENTS

    def channel_now():
        with app.producer_or_acquire() as producer:  # kombu's pools are LIFO: enqueue takes this one next
            return producer.channel

    enqueue(str(uuid.uuid4()), {}, "q-client")
    channel = channel_now()
    first = _CLIENTS[channel]
    assert first.connection_pool is channel.pool
    enqueue(str(uuid.uuid4()), {}, "q-client")
    assert channel_now() is channel and _CLIENTS[channel] is first
    channel._disconnect_pools()  # kombu's own after-fork step
    job_id = str(uuid.uuid4())
    enqueue(job_id, {}, "q-client")
    assert channel_now() is channel and _CLIENTS[channel] is not first
    assert _CLIENTS[channel].connection_pool is channel.pool
    assert [json.loads(p)["headers"]["id"] for p in _lpushed("q-client")][-1] == job_id  # through the new pool


# --- a submit's job-change notification rides its message's round trip ---------------------------


def _changes(pubsub, job_ids: set[str], wait_s: float) -> list[tuple[str, str]]:
    """The notifications for ``job_ids`` that reach ``pubsub`` within ``wait_s``: (job id, kind)."""
    import json
    import time

    seen, until = [], time.monotonic() + wait_s
    while time.monotonic() < until:
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05)
        if message is not None:
            change = json.loads(message["data"])
            if change["job_id"] in job_ids:
                seen.append((change["job_id"], change["kind"]))
    return seen


def test_a_submit_announces_its_job_in_its_enqueue_not_by_the_publisher_thread(database, monkeypatch):
    """A submit's ``submitted`` event wakes the job's streams from the submit's own pipeline (after
    the commit, with the message), once: the commit hook hands the publisher thread nothing for it.
    A job that isn't sent now (it waits for its parent) is still announced, by the thread."""
    from api import service
    from api.schemas import SubmitRequest
    from tasks import notify
    from tasks.process import get_redis

    notify.install()
    handed: list[str] = []
    real = notify.notify_soon
    monkeypatch.setattr(notify, "notify_soon", lambda job_id, kind: (handed.append(job_id), real(job_id, kind)))
    queue = f"q-notify-{uuid.uuid4().hex[:8]}"  # no worker serves it: the job writes nothing more
    pubsub = get_redis().pubsub()
    pubsub.subscribe(notify.channel_for(get_redis()))
    try:
        pubsub.get_message(timeout=1)  # the subscribe confirmation
        job_id = service.submit_job(["One."], queue=queue).job_id
        assert _changes(pubsub, {job_id}, 0.5) == [(job_id, "event")]
        assert job_id not in handed

        child = service.submit_job(["Two."], queue=queue, parent_job_id=job_id).job_id  # waits: not sent
        assert _changes(pubsub, {child}, 1.0) == [(child, "event")]
        assert child in handed

        parent = service.submit_job(["Three."], queue=queue).job_id
        bodies = [SubmitRequest(documents=["Four."]), SubmitRequest(documents=["Five."], parent_job_id=parent)]
        ready, waiting = service.submit_batch(bodies)
        # (a worker may run the ready one, on the default queue: its own rows notify too)
        assert {(ready, "event"), (waiting, "event")} <= set(_changes(pubsub, {ready, waiting}, 1.0))
        assert ready not in handed and waiting in handed
    finally:
        pubsub.close()
        _drain(queue, None)
