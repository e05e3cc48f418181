"""The durable side of cancellation: cancel states in Redis (keys in :mod:`.keys`).

The winning request is written with ``SET NX`` inside one Lua script, so the first cancel wins
atomically across processes, and published on the cancellations channel in the same script, where
each worker's :class:`~tasks.cancellation.watcher.TokenWatcher` hears it.
"""

from __future__ import annotations

import json
import time

import redis

from db.vocabulary import CancellationReason, CancellationSource
from tasks.cancellation.keys import (
    cancel_key,
    cancel_requests_key,
    cancellations_channel,
    heartbeat_key,
    queued_cancels_channel,
    queued_cancels_key,
)
from tasks.cancellation.token import CancelRequest

__all__ = ["QUEUED_CANCELS_KEPT", "CancellationStore"]

#: A cancel: SET NX (first wins), the request log, the winner published (and a queued job's id added
#: to the queued cancels). With ARGV[7] = '1', only if the job's heartbeat (KEYS[4]) lives: -1 if not.
_CANCEL_SCRIPT = """
if ARGV[7] == '1' and redis.call('EXISTS', KEYS[4]) == 0 then
  return {-1, ''}
end
local won = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2])
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[2])
local winner = redis.call('GET', KEYS[1])
if won then
  redis.call('PUBLISH', ARGV[3], winner)
  if ARGV[4] ~= '' then
    redis.call('ZADD', KEYS[3], ARGV[5], ARGV[4])
    redis.call('PUBLISH', ARGV[6], ARGV[4])
  end
end
return {won and 1 or 0, winner}
"""

#: Delete a token only while it holds the given request (compare-and-delete).
_WITHDRAW_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

#: Many queued jobs' tokens in one call: ``SET NX`` per job, as ``_CANCEL_SCRIPT`` without the request
#: log and the publish. KEYS: the n cancel keys; ARGV: the payload's text before and after the job
#: id, the TTL, then the n job ids (JSON-escaped).
_CANCEL_MANY_SCRIPT = """
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], ARGV[1] .. ARGV[3 + i] .. ARGV[2], 'NX', 'EX', ARGV[3])
end
return #KEYS
"""

#: Job ids per call of ``_CANCEL_MANY_SCRIPT``: few, on purpose. With the append-only file on (as
#: andon runs Redis), a script's writes go to it as one ``MULTI … EXEC`` whose cost grows faster than
#: its number of writes: 50,000 jobs' tokens took 1.3–1.9 s of Redis CPU at 1,000 jobs a call and
#: 0.5–0.7 s at 10–20 (without the file 0.4–0.6 s and 0.3–0.5 s), the client's CPU the same. A
#: script also blocks Redis while it runs: ~1 ms per 1,000 jobs, ~20 µs per 20.
CANCEL_MANY_CHUNK = 20
#: Job ids per ``ZADD`` to the queued cancels and per push of them to the workers.
QUEUED_PUSH_CHUNK = 1000
#: The job id a payload template is made with (a uuid4 no job gets: its random bits are 0).
_TEMPLATE_ID = "00000000-0000-4000-8000-000000000000"
#: How many queued cancels the sorted set keeps (the newest): a worker that was away longer than it
#: takes to cancel this many still skips the rest in its pool processes, more slowly.
QUEUED_CANCELS_KEPT = 200_000



class CancellationStore:
    """Create, read, cancel and clean up job tokens in Redis."""

    def __init__(self, client: redis.Redis, ttl_s: int = 7 * 24 * 3600) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self._cancel = client.register_script(_CANCEL_SCRIPT)
        self._cancel_many = client.register_script(_CANCEL_MANY_SCRIPT)
        self._withdraw = client.register_script(_WITHDRAW_SCRIPT)
        db = client.connection_pool.connection_kwargs.get("db", 0)
        self.channel = cancellations_channel(db)
        self.queued_key, self.queued_channel = queued_cancels_key(db), queued_cancels_channel(db)

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

    def apply(self, job_id: str, request: CancelRequest, *, queued: bool = False) -> tuple[bool, CancelRequest]:
        """Set the token with this request (``SET NX``: a token already set keeps its reason) and
        publish it to the workers. ``queued``: the job had not started, so workers' main processes
        may skip its message (it joins the queued cancels). Returns (won, winning request)."""
        applied = self._apply(job_id, request, queued=queued, only_running=False)
        assert applied is not None
        return applied

    def apply_if_running(self, job_id: str, request: CancelRequest) -> tuple[bool, CancelRequest] | None:
        """:meth:`apply`, in the same round trip, only if a process is running the job (its heartbeat
        lives: :class:`~tasks.monitor.JobMonitor` beats it from the job's start and deletes it after
        the job's terminal row); None if not. A cancel of a running job needs no database read first."""
        return self._apply(job_id, request, queued=False, only_running=True)

    def _apply(self, job_id: str, request: CancelRequest, *, queued: bool,
               only_running: bool) -> tuple[bool, CancelRequest] | None:
        won, winner = self._cancel(
            keys=[cancel_key(job_id), cancel_requests_key(job_id), self.queued_key, heartbeat_key(job_id)],
            args=[json.dumps(request.to_json(job_id)), self.ttl_s, self.channel, job_id if queued else "",
                  time.time(), self.queued_channel, "1" if only_running else "0"],
        )
        if won == -1:
            return None
        return bool(won), CancelRequest.from_json(json.loads(winner))

    def withdraw(self, job_id: str, request: CancelRequest) -> None:
        """Remove a token this request set on a job that turned out to be over already (its heartbeat
        outlived its terminal row by a moment): only while the token still holds this request."""
        self._withdraw(keys=[cancel_key(job_id)], args=[json.dumps(request.to_json(job_id))])

    def correct(self, job_id: str, request: CancelRequest) -> None:
        """Make an existing token hold ``request``: the job row recorded an earlier winner while Redis
        was away, and the row is the arbiter then (``SET XX``: a token that expired stays gone)."""
        self.redis.set(cancel_key(job_id), json.dumps(request.to_json(job_id)), xx=True, keepttl=True)

    def cancel_many(
        self, job_ids: list[str], reason: CancellationReason, message: str | None, source: CancellationSource
    ) -> None:
        """Cancel many *queued* jobs in one pipelined round trip, first cancel still winning
        (``_CANCEL_MANY_SCRIPT``, :data:`CANCEL_MANY_CHUNK` jobs per call).

        No token is published (no job of these runs to watch it); after the tokens, the ids join the
        queued cancels, a ``ZADD`` and a push per thousand, so workers' main processes skip their
        messages (a worker that hears of a job finds its token set).

        Nothing goes to the jobs' request logs: the caller ended each of these rows with this
        request and recorded it as the job's ``cancel_requested`` event, in the same transaction.
        The log cost two of the three writes per job (10,000 jobs: 0.26 → 0.10 CPU-s, client and
        Redis together) and nothing reads it.
        """
        if not job_ids:
            return
        request = CancelRequest(reason=reason, message=message, source=source)
        # each job's payload is json.dumps(request.to_json(job_id)), put together in the script: what
        # costs here is redis-py packing three commands per job, not Redis running them
        before, _, after = json.dumps(request.to_json(_TEMPLATE_ID)).partition(json.dumps(_TEMPLATE_ID))
        before, after = before + '"', '"' + after
        now = time.time()
        with self.redis.pipeline(transaction=False) as pipe:
            for start in range(0, len(job_ids), CANCEL_MANY_CHUNK):
                chunk = job_ids[start:start + CANCEL_MANY_CHUNK]
                self._cancel_many(keys=[cancel_key(j) for j in chunk],
                                  args=[before, after, self.ttl_s, *(json.dumps(j)[1:-1] for j in chunk)],
                                  client=pipe)
            for start in range(0, len(job_ids), QUEUED_PUSH_CHUNK):
                chunk = job_ids[start:start + QUEUED_PUSH_CHUNK]
                pipe.zadd(self.queued_key, dict.fromkeys(chunk, now))
                pipe.publish(self.queued_channel, json.dumps(chunk))
            pipe.zremrangebyrank(self.queued_key, 0, -QUEUED_CANCELS_KEPT - 1)
            pipe.execute()

    def queued_since(self, since: float) -> list[tuple[str, float]]:
        """The jobs cancelled while queued at or after ``since`` (epoch seconds), with when."""
        return [(job_id.decode() if isinstance(job_id, bytes) else job_id, score)
                for job_id, score in self.redis.zrangebyscore(self.queued_key, since, "+inf", withscores=True)]

    def read(self, job_ids: list[str]) -> dict[str, CancelRequest]:
        """The winning cancel request of each cancelled job among ``job_ids``."""
        if not job_ids:
            return {}
        raws = self.redis.mget([cancel_key(j) for j in job_ids])
        return {j: CancelRequest.from_json(json.loads(r)) for j, r in zip(job_ids, raws) if r is not None}
