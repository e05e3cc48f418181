"""The peer baseline's worker side: dramatiq with dramatiq-abort, the way its README sets it up — an
``Abortable`` middleware with a Redis event backend on the broker — running the same stages as
andon's built-in pipeline (``tasks.stages``) on the same documents.

Started by bench/peer.py as ``python -m dramatiq bench.peer_worker --processes 1 --threads 2``
(two tasks at a time, like the ``-c 2`` Celery worker), on the benchmark's Redis
(``BENCH_PEER_REDIS_URL``), under its own key namespace.

dramatiq-abort stops a running actor by raising ``Abort`` into its thread
(``PyThreadState_SetAsyncExc``): it lands at the thread's next bytecode, so it can't cut a
``time.sleep`` short, and its watcher thread only listens for the aborts of messages that were
running when its last 1-second ``BLPOP`` began. Both are part of what the figure measures.
"""

from __future__ import annotations

import os
import time
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq_abort import Abort, Abortable
from dramatiq_abort.backends import RedisBackend

from tasks import stages

__all__ = ["NAMESPACE", "QUEUE", "abortable", "broker", "peer_pipeline", "progress_key", "seen_key"]

NAMESPACE = "bench-peer"
QUEUE = "bench-peer"
STAGES = (stages.parse, stages.embed, stages.analyze_local)

client = redis.Redis.from_url(os.environ.get("BENCH_PEER_REDIS_URL", "redis://127.0.0.1:6379/0"))
broker = RedisBroker(client=client, namespace=NAMESPACE)
abortable = Abortable(backend=RedisBackend(client=client, namespace=f"{NAMESPACE}:aborts:"))
broker.add_middleware(abortable)
dramatiq.set_broker(broker)


def progress_key(run_id: str) -> str:
    """Items a run has finished."""
    return f"{NAMESPACE}:done:{run_id}"


def seen_key(run_id: str) -> str:
    """``time.time()`` when the run's thread caught the ``Abort``."""
    return f"{NAMESPACE}:seen:{run_id}"


@dramatiq.actor(queue_name=QUEUE, max_retries=0, time_limit=600_000)
def peer_pipeline(run_id: str, documents: list[str], stage_delay_s: float = 0.0) -> None:
    try:
        for index, document in enumerate(documents):
            value: Any = document
            for stage in STAGES:
                if stage_delay_s:
                    time.sleep(stage_delay_s)  # like AbortableTask's: an async exception can't wake it
                value = stage(value)
            client.set(progress_key(run_id), index + 1, ex=3600)
    except Abort:
        client.set(seen_key(run_id), repr(time.time()), ex=3600)
        raise
