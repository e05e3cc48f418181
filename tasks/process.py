"""What each process holds once: its Redis client, cancellation store, token watcher and event loop.

A prefork child must not reuse its parent's sockets, threads or loop, so each is keyed by pid and
made on first use — after the fork. :func:`reset_process_state` forgets them (a new child, or tests
that change settings).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import redis

from db.settings import get_settings
from tasks.cancellation import CancellationStore, QueuedCancels, TokenWatcher
from tasks.lifecycle import requested_cancels

__all__ = ["get_loop", "get_queued_cancels", "get_redis", "get_store", "get_watcher", "reset_process_state"]

T = TypeVar("T")
_process: dict[str, Any] = {}
_lock = threading.RLock()


def _per_process(name: str, factory: Callable[[], T]) -> T:
    key = f"{name}:{os.getpid()}"
    with _lock:
        if key not in _process:
            _process[key] = factory()
        return _process[key]


#: Bytes each Redis connection reads at a time. hiredis's parser holds a buffer of this size per
#: connection from the start (redis-py's default: 64 KiB), and the pool keeps a connection for each
#: thread that was in a command at once: 100 jobs started together in one process (the memory bench)
#: left 42–84 connections, 27–54 KiB per running job at 64 KiB, 3 at 4 KiB. andon's replies are a few
#: hundred bytes; a large one (the queued cancels a worker reads when it starts, 200,000 of them in
#: 0.4–0.57 s at either size) only takes more reads.
READ_BUFFER_BYTES = 4096


def get_redis() -> redis.Redis:
    settings = get_settings()
    # a paused Redis must not hang a caller (a cancel request, a heartbeat) for longer than this
    return _per_process("redis", lambda: redis.Redis.from_url(
        settings.resolved_redis_url, socket_connect_timeout=2, socket_timeout=settings.redis_timeout_s,
        health_check_interval=10, socket_read_size=READ_BUFFER_BYTES))


def get_store() -> CancellationStore:
    return _per_process("store", lambda: CancellationStore(get_redis(), get_settings().token_ttl_s))


def get_watcher() -> TokenWatcher:
    """The watcher; it reads cancels from the job rows when Redis has lost or never had them."""
    return _per_process("watcher", lambda: TokenWatcher(get_store(), get_settings().token_reconcile_s,
                                                        durable=requested_cancels))


def get_queued_cancels() -> QueuedCancels:
    """The jobs cancelled while queued (a worker's main process skips their messages); not started."""
    return _per_process("queued-cancels", lambda: QueuedCancels(get_store(), ttl_s=get_settings().token_ttl_s))


def get_loop() -> asyncio.AbstractEventLoop:
    """This process's one long-lived event loop, running in a daemon thread of its own.

    Async stages of every job run here: a loop per job would break clients a user's module made at
    import (an ``httpx.AsyncClient`` is bound to the loop it first ran on).
    """
    return _per_process("loop", _start_loop)


def _start_loop() -> asyncio.AbstractEventLoop:
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        loop.run_forever()

    threading.Thread(target=run, name="andon-loop", daemon=True).start()
    ready.wait()
    return loop


def reset_process_state() -> None:
    """Forget clients built from old settings (tests and the embedded stack change URLs)."""
    with _lock:
        objects = [_process.pop(key) for key in list(_process)]
    for obj in objects:
        if isinstance(obj, (TokenWatcher, QueuedCancels)):
            obj.stop()
        elif isinstance(obj, asyncio.AbstractEventLoop) and obj.is_running():
            obj.call_soon_threadsafe(obj.stop)
