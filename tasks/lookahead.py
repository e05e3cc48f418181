"""Taking, in one go, the run of already-cancelled messages at the head of a Redis queue.

With ``worker_prefetch_multiplier=1`` every message costs a worker's main process kombu's whole
cycle, even when the strategy skips it at once: a ``BRPOP``, the unacked bookkeeping
(``QoS.append``: ``ZADD`` + ``HSET``), the ack (``ZREM`` + ``HDEL``) and the loop around them. After a
skip, :func:`take_cancelled_run` looks ahead instead (kombu/transport/redis.py ``_brpop_start``: a
queue's lists are its base list and one per priority step, each popped from its tail):

1. one round trip peeks the next ``peek`` messages of each of the queue's lists;
2. the caller's ``skippable`` says, message by message from the tail, how long the run of messages
   it may skip is;
3. one Lua script pops exactly those: it passes over the first of the run that another worker has
   taken meanwhile, pops each while the list's tail is the very message decided on (the raw string),
   and stops at the first that differs.

A message ``skippable`` refuses is never popped, and nothing is pushed back, so no live job's message
is lost or reordered. The popped messages never enter kombu's unacked hash: no ack is needed, and
none is possible — a worker killed (or a reply lost) between the pop and the caller's writes loses
them. Those are messages of jobs already cancelled, so what is lost is redone by the sweeps
(tasks/signals.py ``_sweep_broker``): a ``cancelled`` row's Celery state by the result sweep
(tasks/results.py), a row still ``pending`` (its cancel's row write never landed) by the broker
sweep, which sends the message of a pending job that no queue and no unacked entry holds again
(tasks/broker.py ``resend_lost``) — to be skipped again. Only the ``task-revoked`` events are gone.

Only kombu's Redis transport, without a ``global_keyprefix``, and only queues this channel consumes;
on any other broker every message keeps the per-message path, which stays the safety net everywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from kombu.transport.redis import Channel as RedisChannel
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads
from redis.commands.core import Script

__all__ = ["PEEK", "take_cancelled_run"]

log = logging.getLogger(__name__)

#: How many messages one look ahead peeks per list, and takes at most in all.
PEEK = 200

#: KEYS: the lists; ARGV: per list how many messages were decided on, then those messages, list after
#: list, in the order RPOP returns them. Per list, the messages another consumer took meanwhile are
#: the first of the run (a list is only popped at its tail): those are passed over until the tail is
#: one of the run, then the tail is popped while it is the next one decided on. Returns per list the
#: index of the first message popped and how many were.
_TAKE = Script(None, b"""
local taken = {}
local at = #KEYS + 1
for i, key in ipairs(KEYS) do
  local n = tonumber(ARGV[i])
  local first, got = 0, 0
  local tail = redis.call('LINDEX', key, -1)
  while first < n and tail ~= ARGV[at + first] do
    first = first + 1
  end
  while first + got < n and tail == ARGV[at + first + got] do
    redis.call('RPOP', key)
    got = got + 1
    tail = redis.call('LINDEX', key, -1)
  end
  taken[i] = {first, got}
  at = at + n
end
return taken
""")


def take_cancelled_run(message, skippable: Callable[[object], str | None], peek: int = PEEK) -> list[str]:
    """Pop the run of messages ``skippable`` names a job id for at the head of ``message``'s queue
    (the message just skipped tells which queue); returns those job ids, in the order popped.

    ``skippable(message)`` gets each candidate as a kombu message and answers its job id, or None
    for one that must take the normal path. Bounded: one pipelined peek of ``peek`` messages per
    list, at most ``peek`` decoded and taken in all, one Lua call."""
    channel = message.channel
    queue = (message.delivery_info or {}).get("routing_key")
    if not isinstance(channel, RedisChannel) or channel.global_keyprefix or queue not in channel.active_queues:
        return []
    lists = list(dict.fromkeys(channel._q_for_pri(queue, pri) for pri in channel.priority_steps))
    with channel.conn_or_acquire() as client:
        with client.pipeline(transaction=False) as pipe:
            for name in lists:
                pipe.lrange(name, -peek, -1)
            peeked = pipe.execute()
        counts, expected, ids = [], [], []
        budget = peek
        for items in peeked:
            run = []
            for raw in reversed(items[-budget:] if budget else []):  # the tail first, as RPOP takes them
                job_id = skippable(channel.Message(loads(bytes_to_str(raw)), channel=channel))
                if job_id is None:
                    break
                run.append((raw, job_id))
            budget -= len(run)
            counts.append(len(run))
            expected += [raw for raw, _ in run]
            ids.append([job_id for _, job_id in run])
        if not expected:
            return []
        taken = _TAKE(keys=lists, args=[*counts, *expected], client=client)
    popped = [job_id for (first, got), run in zip(taken, ids) for job_id in run[int(first):int(first) + int(got)]]
    if popped:
        log.info("andon: took the next %d cancelled messages of %s at once", len(popped), queue)
    return popped
