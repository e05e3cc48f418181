"""Delivers cancels into the tokens of the jobs running in this process: push first, reconcile as a
safety net.

The watcher listens on the cancellations channel and sets the local token at once; it also re-reads
the cancel keys of its active jobs every ``reconcile_s`` and on every reconnect, so a lost pub/sub
message (or a Redis restart) delays a cancel by at most that long — it never loses it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

import redis

from tasks.cancellation.follower import ChannelFollower
from tasks.cancellation.store import CancellationStore
from tasks.cancellation.token import CancellationToken, CancelRequest

__all__ = ["TokenWatcher"]

log = logging.getLogger(__name__)


class TokenWatcher(ChannelFollower):
    """Keeps this process's live tokens in step with Redis (push first, reconcile as a safety net).

    One per process, started lazily on first use so it is born *after* a prefork child forks.
    ``durable`` reads cancels from the job rows: the reconcile asks it for jobs Redis knows nothing
    about, so a cancel survives Redis losing its keys (a restart without persistence) or being
    unreachable when the cancel was requested.
    """

    thread_name = "andon-token-watcher"

    def __init__(self, store: CancellationStore, reconcile_s: float = 1.0,
                 durable: Callable[[list[str]], dict[str, CancelRequest]] | None = None) -> None:
        super().__init__(reconcile_s)
        self.store = store
        self.durable = durable
        self._tokens: dict[str, CancellationToken] = {}
        self._lock = threading.Lock()

    def watch(self, job_id: str) -> CancellationToken:
        """The live token for a job running here. Already cancelled if Redis says so."""
        with self._lock:
            token = self._tokens.get(job_id)
            if token is None:
                token = self._tokens[job_id] = CancellationToken(job_id)
        self._ensure_running()
        try:
            self._apply(self.store.read([job_id]))
        except redis.RedisError:
            self.reconcile_durable([job_id])  # Redis is away; the rows know every cancel
        return token

    def unwatch(self, job_id: str) -> None:
        with self._lock:
            self._tokens.pop(job_id, None)

    def _apply(self, states: dict[str, CancelRequest]) -> None:
        with self._lock:
            targets = [(self._tokens[j], req) for j, req in states.items() if j in self._tokens]
        for token, request in targets:
            if not token.is_cancelled:
                token.apply(request)

    def reconcile(self) -> None:
        with self._lock:
            job_ids = [j for j, token in self._tokens.items() if not token.is_cancelled]
        if not job_ids:
            return
        states = self.store.read(job_ids)
        self._apply(states)
        self.reconcile_durable([j for j in job_ids if j not in states])

    def reconcile_durable(self, job_ids: list[str] | None = None) -> None:
        if self.durable is None:
            return
        if job_ids is None:
            with self._lock:
                job_ids = [j for j, token in self._tokens.items() if not token.is_cancelled]
        if job_ids:
            try:
                self._apply(self.durable(job_ids))
            except Exception:
                log.exception("token watcher: reading cancels from the job rows failed")

    def _on_message(self, data: Any) -> None:
        payload = json.loads(data)
        self._apply({payload["job_id"]: CancelRequest.from_json(payload)})

    def _subscription(self):
        return self.store.redis, self.store.channel

    def _on_lost(self) -> None:
        self.reconcile_durable()  # Redis is away, the rows are not
