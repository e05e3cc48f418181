"""Sending a job's message: one place decides its task, queue and Celery time limits.

Every door that queues a job (submit, resume, a parent completing, a lost message re-sent, a chain
or chord) goes through here, after the job's row is committed: the worker must find the row.
"""

from __future__ import annotations

import base64
import json
import math
import os
import time
from collections.abc import Collection
from typing import Any
from weakref import WeakKeyDictionary

from celery.signals import after_task_publish, before_task_publish
from celery.utils.time import utcoffset
from kombu.transport.redis import Channel as RedisChannel
from kombu.utils.json import dumps as json_dumps

from tasks import notify
from tasks.celery_app import RUN_PIPELINE, app

__all__ = ["ENQUEUE_CHUNK", "enqueue", "enqueue_many", "job_signature", "task_routing"]


def enqueue(job_id: str, options: dict | None = None, queue: str | None = None, announce: bool = False) -> None:
    """Send the pipeline task for a job whose row is committed (the worker must find it): a batch of
    one — on Redis, the message and its task-sent event in one round trip from a cached template
    (Celery's and kombu's publish path per message was most of a single submit's enqueue).
    ``announce``: its job-change notification too (see :func:`enqueue_many`)."""
    enqueue_many([(job_id, options or {}, queue)], [], {job_id} if announce else ())


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

    @staticmethod
    def key(options: dict, queue: str | None) -> tuple:
        """Jobs with one key share a template: same queue, same time limits."""
        return tuple(sorted(task_routing(options, queue).items()))

    def template(self, options: dict, queue: str | None) -> tuple[Any, dict, list]:
        """The template message of this routing (made with ``_TEMPLATE_ID``), its route, and per
        part of the message the keys whose values carry the id."""
        key = self.key(options, queue)
        made = self._made.get(key)
        if made is None:
            template, route = _message(_TEMPLATE_ID, options, queue)
            # per part of the message: the keys whose values carry the id (the rest is shared, unchanged)
            made = self._made[key] = template, route, [[k for k, v in part.items() if _has_id(v)]
                                                       if isinstance(part, dict) else None for part in template]
        return made

    def message(self, job_id: str, options: dict, queue: str | None) -> tuple[Any, dict]:
        template, route, id_keys = self.template(options, queue)
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


# --- Redis: a chunk's messages written straight to a pipeline ------------------------------------


class _Capture:
    """Stands in for kombu's Redis ``PublishBatch`` while one template message goes through the
    whole Celery and kombu path: the Redis channel hands it the commands it would buffer
    (``_put``'s ``LPUSH``, ``_put_fanout``'s ``PUBLISH`` of the ``task-sent`` event) instead."""

    def __init__(self) -> None:
        self.commands: list[tuple[str, tuple]] = []

    def publish(self, channel, message, **kwargs) -> None:
        channel.basic_publish(message, _publish_batch=self, **kwargs)

    def add(self, name: str, *args: Any) -> None:
        self.commands.append((name, args))


class _RedisTemplate:
    """What kombu's Redis channel writes for one routing, made once with the template id: the
    ``LPUSH`` key and payload of the task message, and the ``PUBLISH`` topics and payload of its
    ``task-sent`` event. A job's payload is the template's with its id put where the template's is,
    its own base64 body (the body holds the id) and its own delivery tag; its event's body gets a
    fresh clock, timestamp and UTC offset too, as Celery's dispatcher gives each event. All string
    work: the JSON is the template's, so its keys keep kombu's and Celery's order."""

    def __init__(self, key: str, payload: str, topics: list[str], event_payload: str | None) -> None:
        self.key, self.payload, self.topics = key, payload, topics
        envelope = json.loads(payload)
        self.b64, self.tag = envelope["body"], envelope["properties"]["delivery_tag"]
        self.body = _decoded(self.b64)
        self.event_payload = self.event_b64 = self.event_tag = self.event_body = None
        if event_payload is not None:
            envelope = json.loads(event_payload)
            self.event_payload, self.event_tag = event_payload, envelope["properties"]["delivery_tag"]
            self.event_b64 = envelope["body"]
            event = json.loads(_decoded(self.event_b64))
            # the per-event values, as placeholders in the template's JSON
            event.update(utcoffset=_UTCOFFSET, clock=_CLOCK, timestamp=_TIMESTAMP)
            self.event_body = json_dumps(event)

    @classmethod
    def capture(cls, producer, message: Any, route: dict) -> _RedisTemplate | None:
        """Send the template message through Celery and kombu into a :class:`_Capture`; ``None``
        when kombu would write anything but one ``LPUSH`` and its event (a queue with
        ``x-expires``, say): those jobs take kombu's path."""
        capture, local = _Capture(), producer._batch_local
        outer, local.current = getattr(local, "current", None), capture
        try:
            _publish(producer, message, {**route, "retry": False})
        finally:
            local.current = outer
        pushes = [args for name, args in capture.commands if name == "lpush"]
        events = [args for name, args in capture.commands if name == "publish"]
        if len(pushes) != 1 or len(pushes) + len(events) != len(capture.commands) or \
                len({payload for _, payload in events}) > 1 or bool(events) != bool(message[3]):
            return None
        (key, payload), = pushes
        return cls(key, payload, [topic for topic, _ in events], events[0][1] if events else None)

    def commands(self, channel, job_id: str) -> list[tuple[str, str, str]]:
        """The job's ``LPUSH`` (and ``PUBLISH`` commands of its event), as kombu would buffer them."""
        b64 = _encoded(channel, self.body.replace(_TEMPLATE_ID, job_id))
        payload = self.payload.replace(self.b64, b64, 1).replace(self.tag, channel._next_delivery_tag(), 1)
        commands = [("lpush", self.key, payload.replace(_TEMPLATE_ID, job_id))]
        if self.event_body is not None:
            event = self._event_payload(channel, job_id)
            commands += [("publish", topic, event) for topic in self.topics]
        return commands

    def _event_payload(self, channel, job_id: str) -> str:
        body = (self.event_body.replace(_TEMPLATE_ID, job_id)
                .replace(_UTCOFFSET_JSON, _json_number(utcoffset()), 1)
                .replace(_CLOCK_JSON, _json_number(app.amqp._event_dispatcher.clock.forward()), 1)
                .replace(_TIMESTAMP_JSON, _json_number(time.time()), 1))
        return self.event_payload.replace(self.event_b64, _encoded(channel, body), 1).replace(
            self.event_tag, channel._next_delivery_tag(), 1)


#: Placeholders of an event's per-event values in its template JSON (strings no event holds).
_UTCOFFSET, _CLOCK, _TIMESTAMP = "\x00andon-utcoffset", "\x00andon-clock", "\x00andon-timestamp"
_UTCOFFSET_JSON, _CLOCK_JSON, _TIMESTAMP_JSON = (json_dumps(p) for p in (_UTCOFFSET, _CLOCK, _TIMESTAMP))


def _json_number(value: int | float) -> str:
    """A number as ``json.dumps`` writes it (``int.__repr__``, ``float.__repr__``), without its
    encoder object per call: three per event were a tenth of a batch's enqueue CPU."""
    if isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
        return json_dumps(value)
    return repr(value)


def _decoded(b64: str) -> str:
    return base64.b64decode(b64).decode("utf-8")


def _encoded(channel, body: str) -> str:
    """The body as kombu's channel stores it (``body_encoding``: base64)."""
    return channel.encode_body(body, channel.body_encoding)[0]


#: Jobs whose messages go to the broker in one round trip (kombu's publish batch: a Redis pipeline).
ENQUEUE_CHUNK = 500


def enqueue_many(jobs: list[tuple[str, dict | None, str | None]], sent: list[str],
                 announce: Collection[str] = ()) -> None:
    """Send the pipeline task for many committed rows (``(job_id, options, queue)``) through one
    producer, ``ENQUEUE_CHUNK`` jobs per broker round trip. The messages are made from templates
    (:class:`_Templates`). On Redis, each chunk's ``LPUSH`` commands and ``task-sent`` events go straight
    into one pipeline (:func:`_redis_templates`: kombu's publish machinery per message was most of a
    batch's CPU); on other brokers, or with a ``before_task_publish``/``after_task_publish``
    receiver connected, through kombu's publish batch. A chunk's ids are appended to ``sent`` once
    it is flushed; after a broker error, the jobs not in ``sent`` may have no message (a message of
    theirs that got through anyway finds the row the caller ends, and is skipped).

    ``announce``: jobs whose job-change notification the caller took off the commit hook
    (:func:`tasks.notify.claim`). Each is published after its message: in its chunk's pipeline
    where the broker is the notifications' Redis server, else handed to the publisher thread when
    this call ends, for the jobs in ``sent``. An unsent job's is dropped with it (the caller's
    ``failed`` event announces it)."""
    templates = _Templates()
    first, rode = len(sent), False
    try:
        with app.producer_or_acquire() as producer, producer.connection._reraise_as_library_errors():
            redis = _redis_templates(producer, jobs, templates)
            if redis is not None:
                changes = notify.channel_on(_client(producer.channel)) if announce else None
                rode = changes is not None
                _pipelined(producer.channel, jobs, redis, sent, announce, changes)
            else:
                _kombu_batches(producer, jobs, templates, sent)
    finally:
        if announce and not rode:
            for job_id in sent[first:]:
                if job_id in announce:
                    notify.notify_soon(job_id, "event")


def _redis_templates(producer, jobs: list, templates: _Templates) -> list[_RedisTemplate] | None:
    """Per job, what kombu's Redis channel writes for its routing's template (captured through the
    whole publish path, which also declares the queue); ``None`` to take kombu's path: not a Redis
    channel, a publish signal someone listens to (it must see every message), a kombu without the
    producer batch we capture through, a ``body_encoding`` other than base64, or a routing kombu
    writes more for than one ``LPUSH`` and its event."""
    channel = producer.channel
    if not isinstance(channel, RedisChannel) or before_task_publish.receivers or after_task_publish.receivers \
            or getattr(producer, "_batch_local", None) is None \
            or channel.body_encoding != "base64":  # kombu's default; the templates rewrite base64 bodies
        return None
    cache = _cache(channel)
    per_job: list[_RedisTemplate] = []
    for _, options, queue in jobs:
        key = templates.key(options or {}, queue)
        captured = cache.get(key)
        if captured is None:
            template, route, _ = templates.template(options or {}, queue)
            captured = _RedisTemplate.capture(producer, _copy_message(template), route)
            if captured is None:
                return None
            cache[key] = captured
        per_job.append(captured)
    return per_job


#: Captured templates per channel: a channel made after a reconnect captures (and so declares its
#: queues) again. Keyed also by what a template holds of its sender: the process, the thread
#: (``reply_to``: Celery's ``thread_oid``).
_CAPTURED: WeakKeyDictionary[Any, dict[tuple, _RedisTemplate]] = WeakKeyDictionary()
#: Routings kept per channel and sender (a template is a few hundred bytes).
_CAPTURED_MAX = 256


def _cache(channel) -> dict:
    """Where this sender's captured templates live. In a worker's task (a parent's children), the
    templates carry that task's root and parent ids: a fresh dict each call, as nothing is shared."""
    if app.current_worker_task is not None:
        return {}
    per_channel = _CAPTURED.setdefault(channel, {})
    sender = (os.getpid(), app.thread_oid)
    cache = per_channel.get(sender)
    if cache is None or len(cache) > _CAPTURED_MAX:
        cache = per_channel[sender] = {}
    return cache


#: A Redis client per channel, over the channel's pool: kombu's ``conn_or_acquire()`` makes a new
#: ``redis.Redis`` per publish, and redis-py's set-up of one is 0.2 ms — a twentieth of a single
#: submit's CPU. (A client is thread-safe; it is only the pool's connections that are shared.)
_CLIENTS: WeakKeyDictionary[Any, Any] = WeakKeyDictionary()


def _client(channel) -> Any:
    """The channel's client, made as kombu makes it (``_create_client``), and made again when the
    channel's pool is not the one it was made over (kombu drops a channel's pools after a fork)."""
    pool = channel.pool
    client = _CLIENTS.get(channel)
    if client is None or client.connection_pool is not pool:
        client = _CLIENTS[channel] = channel._create_client()
    return client


def _copy_message(message: Any) -> Any:
    """A copy the publish path may update in place (headers, properties, the event)."""
    return type(message)(*(dict(part) if isinstance(part, dict) else part for part in message))


def _pipelined(channel, jobs: list, redis: list[_RedisTemplate], sent: list[str],
               announce: Collection[str] = (), changes: str | None = None) -> None:
    """Write each chunk's commands in one non-transactional pipeline, as kombu's ``PublishBatch``
    does (never retried: delivery would be uncertain; a broker error fails the chunk).

    A chunk's messages for one list go in one ``LPUSH`` of many values — Redis pushes them one
    after another, left to right, so the list ends as one ``LPUSH`` per job would leave it — and
    then the ``task-sent`` events, so each event still follows its message. A third of a batch's
    commands fewer for redis-py to pack and to read the reply of. Then, on channel ``changes``, the
    job-change notifications of the chunk's jobs in ``announce``."""
    client = _client(channel)
    for start in range(0, len(jobs), ENQUEUE_CHUNK):
        chunk = jobs[start:start + ENQUEUE_CHUNK]
        pushes: dict[str, list[str]] = {}
        events: list[tuple[str, str]] = []
        for (job_id, _, _), template in zip(chunk, redis[start:start + ENQUEUE_CHUNK]):
            for name, key, payload in template.commands(channel, job_id):
                if name == "lpush":
                    pushes.setdefault(key, []).append(payload)
                else:
                    events.append((key, payload))
        with client.pipeline(transaction=False) as pipe:
            for key, payloads in pushes.items():
                pipe.lpush(key, *payloads)
            for topic, payload in events:
                pipe.publish(topic, payload)
            if changes is not None:
                for job_id, _, _ in chunk:
                    if job_id in announce:
                        notify.notify_in(pipe, job_id, "event", changes)
            pipe.execute()
        sent.extend(job_id for job_id, _, _ in chunk)


def _kombu_batches(producer, jobs: list, templates: _Templates, sent: list[str]) -> None:
    """kombu's publish batch: a Redis pipeline where the transport has one, one publish at a time
    elsewhere; each queue is declared with its first message only.

    Buffered publishes touch no socket once their queue is declared, so kombu's retry wrapper
    (connection.ensure) has nothing to retry there — a fifth of the CPU per message. The flush is
    never retried (kombu/transport/redis.py: delivery would be uncertain); a broker error there
    fails the chunk. Unbuffered transports keep Celery's retry on every message."""
    declared: set[str | None] = set()
    buffered = producer.supports_batch_publish
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
