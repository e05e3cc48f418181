"""The jobs cancelled while queued, as one process knows them: pushed by Redis, reconciled as a
safety net — so a worker's main process can skip their messages before any pool process is involved.

Like the :class:`~.watcher.TokenWatcher`, push first (the queued-cancels channel), reconcile after
(the sorted set every such cancel joins, read on every reconnect and every ``reconcile_s``): a lost
push delays the skip by at most that long. What it can't do: know a job cancelled longer ago than
the set keeps (:data:`~.store.QUEUED_CANCELS_KEPT` newest, ``ttl_s``), or one cancelled while Redis
was away — those messages reach a pool process, whose own check (the row is terminal, the token is
set) still keeps the job from starting.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict

from tasks.cancellation.follower import ChannelFollower
from tasks.cancellation.store import QUEUED_CANCELS_KEPT, CancellationStore

__all__ = ["QueuedCancels"]


class QueuedCancels(ChannelFollower):
    """A bounded, thread-safe set of job ids cancelled while queued, kept in step with Redis."""

    thread_name = "andon-queued-cancels"

    def __init__(self, store: CancellationStore, reconcile_s: float = 5.0, ttl_s: float = 7 * 24 * 3600,
                 kept: int = QUEUED_CANCELS_KEPT) -> None:
        super().__init__(reconcile_s)
        self.store = store
        self.ttl_s = ttl_s
        self.kept = kept
        self._ids: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()
        self._since = 0.0  # the newest score reconciled so far

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._ids  # a dict lookup: safe without the lock

    def __len__(self) -> int:
        return len(self._ids)

    def start(self) -> QueuedCancels:
        self._ensure_running()
        return self

    def add(self, job_ids: list[str], at: float | None = None) -> None:
        at = at or time.time()
        with self._lock:
            for job_id in job_ids:
                self._ids[job_id] = at
                self._ids.move_to_end(job_id)
            while len(self._ids) > self.kept:
                self._ids.popitem(last=False)

    def reconcile(self) -> None:
        """Read what joined the set since the last read (a little overlap: pushes are not ordered
        with the reads), and trim what is older than the tokens themselves."""
        now = time.time()
        self.store.redis.zremrangebyscore(self.store.queued_key, "-inf", now - self.ttl_s)
        entries = self.store.queued_since(max(self._since - 5.0, now - self.ttl_s))
        if entries:
            self.add([job_id for job_id, _ in entries])
            self._since = max(self._since, max(score for _, score in entries))

    def _on_message(self, data: bytes | str) -> None:
        text = data.decode() if isinstance(data, bytes) else data
        self.add(json.loads(text) if text.startswith("[") else [text])

    def _subscription(self):
        return self.store.redis, self.store.queued_channel
