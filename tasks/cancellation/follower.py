"""One Redis channel followed by a thread of its own: push first, reconcile as the safety net.

The :class:`~.watcher.TokenWatcher` (cancels of running jobs) and :class:`~.queued.QueuedCancels`
(jobs cancelled while queued) keep local state in step with Redis the same way: subscribe, read what
was missed (on every connect and every ``reconcile_s``), apply each pushed message, and on a lost
connection back off and start over. This is that loop, written once.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis

__all__ = ["ChannelFollower"]

log = logging.getLogger(__name__)


class ChannelFollower:
    """Base for a thread that follows ``channel`` on ``client``; subclasses say what a message and a
    reconcile do. ``connected`` is set once subscribed and reconciled, cleared while Redis is away."""

    thread_name = "andon-channel"

    def __init__(self, reconcile_s: float) -> None:
        self.reconcile_s = reconcile_s
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what a subclass provides
    def _subscription(self) -> tuple[redis.Redis, str]:
        raise NotImplementedError

    def reconcile(self) -> None:
        raise NotImplementedError

    def _on_message(self, data: Any) -> None:
        raise NotImplementedError

    def _on_lost(self) -> None:
        """Redis went away (before the back-off): a subclass may fall back to another source."""

    # -- the loop
    def _ensure_running(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            client, channel = self._subscription()
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(channel)
                self.reconcile()  # whatever was published while we were away
                self.connected.set()
                backoff = 0.05
                last = time.monotonic()
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=self.reconcile_s)
                    if message is not None:
                        self._on_message(message["data"])
                    if time.monotonic() - last >= self.reconcile_s:
                        self.reconcile()
                        last = time.monotonic()
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                self.connected.clear()
                log.warning("%s lost Redis (%s); reconnecting", self.thread_name, exc)
                self._on_lost()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 1.0)
            except Exception:  # never let the thread die silently
                log.exception("%s: error", self.thread_name)
                self._stop.wait(backoff)
            finally:
                try:
                    pubsub.close()
                except Exception:
                    pass
