"""One fix to kombu's Redis transport: a worker survives its broker restarting while it holds a
delivered message (celery/kombu#970).

On a lost broker connection Celery's consumer (``on_connection_error_after_connected``) first
``collect()``\\ s the connection, then ``close()``\\ s it. When the loss hit while the channel was in
a BRPOP, ``collect()``'s closes of the channel fail — on that read, then on deleting the worker's
auto-delete fanout queue (remote control's pidbox) — with connection errors it swallows, and it
then detaches the transport from its connection (``transport.client = None``). ``close()`` runs the
channel's close once more, now through to restoring the unacked messages: kombu builds a new Redis
pool from ``transport.client.hostname`` — ``None`` — and the ``AttributeError`` is no connection
error, so it escapes to the worker as ``Unrecoverable error`` and the worker exits.

The fix is only here: a channel whose transport was detached answers a broker *connection* error,
which is what restoring the unacked messages meets anyway while Redis is down (the first close's
path). Celery swallows it and reconnects; the unacked messages stay in kombu's unacked hash, as
they do whenever a restore can't reach Redis. The job still running in the pool runs on; its ack
can't go through the closed channel, so its message stays parked until the job has ended and
andon's broker sweep puts it back on its queue (:func:`tasks.broker.release_parked`), where a
worker finds the job ended and acks it.

:func:`install` (called by :func:`tasks.wiring.install`) makes kombu's Redis transport open this
channel class: the only change andon makes to kombu, and it changes nothing but the case above,
where kombu would raise ``AttributeError``. A subclassed transport set as ``broker_transport`` would
be cleaner, but kombu then names the broker URL after the class, and Flower's broker page (which
dispatches on the URL's scheme) stops working. When ``tests/test_transport.py`` finds kombu's own
channel closes cleanly, kombu has fixed it and this module can go.
"""

from __future__ import annotations

from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError

__all__ = ["Channel", "install"]


class Channel(kombu_redis.Channel):
    """kombu's Redis channel, but a detached transport is a broker connection error."""

    def _connparams(self, asynchronous: bool = False) -> dict:
        transport = self.connection
        if transport is None or transport.client is None:  # collect()ed under us (celery/kombu#970)
            raise RedisConnectionError("the broker connection was closed; nothing to restore through")
        return super()._connparams(asynchronous)


def install() -> None:
    """Every kombu Redis transport in this process opens :class:`Channel` (idempotent)."""
    kombu_redis.Transport.Channel = Channel
