"""Taking, in one go, the run of already-cancelled messages at the head of a Redis queue.

With ``worker_prefetch_multiplier=1`` every message costs a worker's main process kombu's whole
cycle, even when the strategy skips it at once: a ``BRPOP``, the unacked bookkeeping
(``QoS.append``: ``ZADD`` + ``HSET``), the ack (``ZREM`` + ``HDEL``) and the loop around them. After a
skip, :func:`take_cancelled_run` looks ahead instead (kombu/transport/redis.py ``_brpop_start``: a
queue's lists are its base list and one per priority step, each popped from its tail):

1. one round trip peeks the next ``peek`` messages of each of the queue's lists;
2. the caller's ``skippable`` says, message by message from the tail, how long the run of messages
   it may skip is;
3. a Lua script pops exactly those, ``chunk`` at a time: it passes over the first of them that
   another worker has taken meanwhile, pops each while the list's tail is the very message decided
   on (the raw string), and stops at the first that differs — and so does the look ahead.

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

__all__ = ["CHUNK", "PEEK", "take_cancelled_run"]

log = logging.getLogger(__name__)

#: How many messages one look ahead peeks per list, and decides on and takes at most in all.
PEEK = 200
#: How many it decides on before it pops them: two workers look ahead over the same messages at
#: once, and the one that finds them gone stops after this many decisions, not ``PEEK``.
CHUNK = 50

#: KEYS: the list; ARGV: the messages decided on, in the order RPOP returns them. Those another
#: consumer took meanwhile are the first of them (a list is only popped at its tail): they are passed
#: over until the tail is one of them, then the tail is popped while it is the next one decided on.
#: Returns the index of the first message popped and how many were.
_TAKE = Script(None, b"""
local first, got = 0, 0
local tail = redis.call('LINDEX', KEYS[1], -1)
while first < #ARGV and tail ~= ARGV[first + 1] do
  first = first + 1
end
while first + got < #ARGV and tail == ARGV[first + got + 1] do
  redis.call('RPOP', KEYS[1])
  got = got + 1
  tail = redis.call('LINDEX', KEYS[1], -1)
end
return {first, got}
""")


def take_cancelled_run(message, skippable: Callable[[object], str | None], peek: int = PEEK,
                       chunk: int = CHUNK) -> list[str]:
    """Pop the run of messages ``skippable`` names a job id for at the head of ``message``'s queue
    (the message just skipped tells which queue); returns those job ids, in the order popped.

    ``skippable(message)`` gets each candidate as a kombu message and answers its job id, or None
    for one that must take the normal path. Bounded: one pipelined peek of ``peek`` messages per
    list, at most ``peek`` taken in all, one Lua call per ``chunk`` of them."""
    channel = message.channel
    queue = (message.delivery_info or {}).get("routing_key")
    if not isinstance(channel, RedisChannel) or channel.global_keyprefix or queue not in channel.active_queues:
        return []
    lists = list(dict.fromkeys(channel._q_for_pri(queue, pri) for pri in channel.priority_steps))
    popped: list[str] = []
    budget = peek
    with channel.conn_or_acquire() as client:
        with client.pipeline(transaction=False) as pipe:
            for name in lists:
                pipe.lrange(name, -peek, -1)
            peeked = pipe.execute()
        for name, items in zip(lists, peeked):
            candidates = items[::-1]  # the tail first, as RPOP takes them
            at = 0
            while budget > 0 and at < len(candidates):
                window = candidates[at:at + min(chunk, budget)]
                run = []
                for raw in window:
                    job_id = skippable(channel.Message(loads(bytes_to_str(raw)), channel=channel))
                    if job_id is None:
                        break
                    run.append((raw, job_id))
                budget -= len(run)
                at += len(run)
                if run:
                    first, got = (int(n) for n in _TAKE(keys=[name], args=[raw for raw, _ in run], client=client))
                    popped += [job_id for _, job_id in run[first:first + got]]
                    if got == 0 or first + got < len(run):  # another worker is ahead, or the tail differs
                        break
                if len(run) < len(window):  # the next message takes the normal path
                    break
    if popped:
        log.info("andon: took the next %d cancelled messages of %s at once", len(popped), queue)
    return popped
