"""The durable side of cancellation: cancel states in Redis, and the watcher that delivers them.

Keys (all with a TTL so an abandoned job never leaks):

* ``andon:token:<job>``            — the job's token exists (set at submit).
* ``andon:cancel:<job>``           — the *winning* cancel request, JSON. Written with ``SET NX``
  inside one Lua script, so the first cancel wins atomically across processes.
* ``andon:cancel:<job>:requests``  — every request, winners and losers, for the record.

Every winning cancel is also published on ``andon:cancellations``. A :class:`TokenWatcher` in each
worker process listens there and sets the local :class:`~tasks.token.CancellationToken` at once; it
also re-reads the keys of its active jobs every ``token_reconcile_s`` and on every reconnect, so a
lost pub/sub message (or a Redis restart) delays a cancel by at most that long — it never loses it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from db.settings import get_settings
from db.vocabulary import CancellationReason, CancellationSource
from tasks.token import CancellationToken, CancelRequest

log = logging.getLogger(__name__)

#: Pub/sub ignores database numbers: the channel carries the store's, so two andon deployments on
#: one Redis server (different ``/db``) never hear each other's cancels.
CHANNEL = "andon:cancellations:{db}"

_CANCEL_SCRIPT = """
local won = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2])
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[2])
local winner = redis.call('GET', KEYS[1])
if won then redis.call('PUBLISH', ARGV[3], winner) end
return {won and 1 or 0, winner}
"""


def _token_key(job_id: str) -> str:
    return f"andon:token:{job_id}"


def _cancel_key(job_id: str) -> str:
    return f"andon:cancel:{job_id}"


class CancellationStore:
    """Create, read, cancel and clean up job tokens in Redis."""

    def __init__(self, client: redis.Redis, ttl_s: int = 7 * 24 * 3600) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self._cancel = client.register_script(_CANCEL_SCRIPT)
        self.channel = CHANNEL.format(db=client.connection_pool.connection_kwargs.get("db", 0))

    def create(self, job_id: str) -> None:
        self.redis.set(_token_key(job_id), "1", ex=self.ttl_s)

    def create_many(self, job_ids: list[str]) -> None:
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.set(_token_key(job_id), "1", ex=self.ttl_s)
            pipe.execute()

    def get(self, job_id: str) -> CancellationToken | None:
        """A snapshot token with the job's current cancel state, or None if Redis knows no such job."""
        exists, raw = self.redis.pipeline().exists(_token_key(job_id)).get(_cancel_key(job_id)).execute()
        if not exists and raw is None:
            return None
        token = CancellationToken(job_id)
        if raw is not None:
            token.apply(CancelRequest.from_json(json.loads(raw)))
        return token

    def cancel(
        self,
        job_id: str,
        reason: CancellationReason | str = CancellationReason.USER_REQUESTED,
        message: str | None = None,
        source: CancellationSource | str | None = None,
    ) -> tuple[bool, CancelRequest]:
        """Request cancellation. Returns (won, winning request): later requests don't change the reason."""
        request = CancelRequest(
            reason=CancellationReason(reason),
            message=message,
            source=CancellationSource(source) if source else None,
        )
        return self.apply(job_id, request)

    def apply(self, job_id: str, request: CancelRequest) -> tuple[bool, CancelRequest]:
        """Set the token with this request (``SET NX``: a token already set keeps its reason) and
        publish it to the workers. Returns (won, winning request)."""
        won, winner = self._cancel(
            keys=[_cancel_key(job_id), f"{_cancel_key(job_id)}:requests"],
            args=[json.dumps(request.to_json(job_id)), self.ttl_s, self.channel],
        )
        return bool(won), CancelRequest.from_json(json.loads(winner))

    def cancel_many(
        self, job_ids: list[str], reason: CancellationReason, message: str | None, source: CancellationSource
    ) -> None:
        """Cancel many *queued* jobs in one pipelined round trip, first cancel still winning.

        Nothing is published: no worker watches a job that hasn't started, and it reads the state
        when it does start (and the row is already ``cancelled``).
        """
        request = CancelRequest(reason=reason, message=message, source=source)
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                payload = json.dumps(request.to_json(job_id))
                pipe.set(_cancel_key(job_id), payload, nx=True, ex=self.ttl_s)
                pipe.rpush(f"{_cancel_key(job_id)}:requests", payload)
                pipe.expire(f"{_cancel_key(job_id)}:requests", self.ttl_s)
            pipe.execute()

    def read(self, job_ids: list[str]) -> dict[str, CancelRequest]:
        """The winning cancel request of each cancelled job among ``job_ids``."""
        if not job_ids:
            return {}
        raws = self.redis.mget([_cancel_key(j) for j in job_ids])
        return {j: CancelRequest.from_json(json.loads(r)) for j, r in zip(job_ids, raws) if r is not None}

    def cleanup(self, job_id: str) -> None:
        self.redis.delete(_token_key(job_id), _cancel_key(job_id), f"{_cancel_key(job_id)}:requests")


class TokenWatcher:
    """Keeps this process's live tokens in step with Redis (push first, reconcile as a safety net).

    One per process, started lazily on first use so it is born *after* a prefork child forks.
    ``durable`` reads cancels from the job rows: the reconcile asks it for jobs Redis knows nothing
    about, so a cancel survives Redis losing its keys (a restart without persistence) or being
    unreachable when the cancel was requested.
    """

    def __init__(self, store: CancellationStore, reconcile_s: float = 1.0,
                 durable: Callable[[list[str]], dict[str, CancelRequest]] | None = None) -> None:
        self.store = store
        self.reconcile_s = reconcile_s
        self.durable = durable
        self._tokens: dict[str, CancellationToken] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.connected = threading.Event()

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

    def stop(self) -> None:
        self._stop.set()

    def _ensure_running(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="andon-token-watcher", daemon=True)
            self._thread.start()

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

    def _run(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            pubsub = self.store.redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self.store.channel)
                self.connected.set()
                self.reconcile()  # whatever was published while we were away
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
                log.warning("token watcher lost Redis (%s); reconnecting", exc)
                self.reconcile_durable()  # Redis is away, the rows are not
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 1.0)
            except Exception:  # never let the watcher die silently
                log.exception("token watcher error")
                self._stop.wait(backoff)
            finally:
                try:
                    pubsub.close()
                except Exception:
                    pass


_process: dict[str, Any] = {}


def _per_process(name: str, factory):
    """One instance per process: a prefork child must not reuse its parent's sockets or threads."""
    key = f"{name}:{os.getpid()}"
    if key not in _process:
        _process[key] = factory()
    return _process[key]


def get_redis() -> redis.Redis:
    settings = get_settings()
    return _per_process(
        "redis",
        lambda: redis.Redis.from_url(settings.resolved_redis_url, socket_connect_timeout=2, health_check_interval=10),
    )


def get_store() -> CancellationStore:
    return _per_process("store", lambda: CancellationStore(get_redis(), get_settings().token_ttl_s))


def get_watcher() -> TokenWatcher:
    from tasks.control import requested_cancels

    return _per_process("watcher", lambda: TokenWatcher(get_store(), get_settings().token_reconcile_s,
                                                        durable=requested_cancels))


def reset_process_state() -> None:
    """Forget clients built from old settings (tests and the embedded stack change URLs)."""
    for key in list(_process):
        obj = _process.pop(key)
        if isinstance(obj, TokenWatcher):
            obj.stop()
