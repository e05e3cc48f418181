"""CancellationToken, CancellationStore and TokenWatcher: the semantics the pipeline relies on."""

from __future__ import annotations

import os
import threading
import time
import uuid

import pytest
import redis

from db.vocabulary import CancellationReason, CancellationSource
from tasks.cancellation import CancellationStore, CancellationToken, TokenWatcher
from tasks.errors import CancellationError
from tests.procs import wait_for


def test_first_cancel_wins_and_later_ones_are_recorded():
    token = CancellationToken("j")
    assert token.cancel(CancellationReason.TIMEOUT, "deadline", CancellationSource.DEADLINE) is True
    assert token.cancel(CancellationReason.USER_REQUESTED, "too late", CancellationSource.API) is False
    assert token.reason is CancellationReason.TIMEOUT
    assert token.message == "deadline"
    assert token.source is CancellationSource.DEADLINE
    assert [r.reason for r in token.requests] == [CancellationReason.TIMEOUT, CancellationReason.USER_REQUESTED]
    assert token.cancelled_at is not None


def test_check_raises_with_the_winning_reason_only_after_cancel():
    token = CancellationToken("j")
    token.check()
    token.cancel("resource_limit", "rss 900MB", "memory_watchdog")
    with pytest.raises(CancellationError) as caught:
        token.check()
    assert caught.value.reason is CancellationReason.RESOURCE_LIMIT
    assert caught.value.source is CancellationSource.MEMORY_WATCHDOG
    assert caught.value.job_id == "j"


def test_unknown_reason_is_rejected_at_once():
    with pytest.raises(ValueError):
        CancellationToken("j").cancel("bored")


def test_callbacks_run_once_and_at_once_when_registered_late():
    token = CancellationToken("j")
    calls = []
    token.register_callback(lambda t: calls.append(("early", t.reason)))
    token.cancel()
    token.cancel(CancellationReason.TIMEOUT)
    token.register_callback(lambda t: calls.append(("late", t.reason)))
    assert calls == [("early", CancellationReason.USER_REQUESTED), ("late", CancellationReason.USER_REQUESTED)]


def test_callback_errors_are_collected_never_raised_into_the_canceller():
    token = CancellationToken("j")
    ran = []

    def broken(_):
        raise RuntimeError("boom")

    token.register_callback(broken)
    token.register_callback(lambda t: ran.append(True))
    assert token.cancel() is True
    assert ran == [True]
    assert [str(e) for e in token.callback_errors] == ["boom"]


def test_wait_returns_early_on_cancel():
    token = CancellationToken("j")
    threading.Timer(0.05, token.cancel).start()
    started = time.monotonic()
    assert token.wait(10) is True
    assert time.monotonic() - started < 1
    assert CancellationToken("k").wait(0.01) is False


def test_store_first_cancel_wins_atomically_across_clients(redis_client):
    job = str(uuid.uuid4())
    stores = [CancellationStore(redis.Redis.from_url(os.environ["ANDON_REDIS_URL"])) for _ in range(8)]
    reasons = list(CancellationReason) * 2
    outcomes = []
    barrier = threading.Barrier(len(stores))

    def race(store, reason):
        barrier.wait()
        outcomes.append(store.cancel(job, reason, None, CancellationSource.API))

    threads = [threading.Thread(target=race, args=(s, reasons[i])) for i, s in enumerate(stores)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    winners = [w for won, w in outcomes if won]
    assert len(winners) == 1
    assert {w.reason for _, w in outcomes} == {winners[0].reason}
    assert redis_client.llen(f"andon:cancel:{job}:requests") == len(stores)
    assert stores[0].read([job])[job].reason is winners[0].reason


def test_store_read_unknown_and_ttl(store):
    job = str(uuid.uuid4())
    assert store.read([job]) == {}
    store.cancel(job, "timeout", "late", "deadline")
    assert store.read([job])[job].reason is CancellationReason.TIMEOUT
    assert store.redis.ttl(f"andon:cancel:{job}") > 0


def test_watcher_delivers_a_cancel_from_another_client_by_push(store):
    watcher = TokenWatcher(CancellationStore(redis.Redis.from_url(os.environ["ANDON_REDIS_URL"])), reconcile_s=30)  # reconcile too slow to matter: only pub/sub can deliver in time
    try:
        job = str(uuid.uuid4())
        token = watcher.watch(job)
        wait_for(watcher.connected.is_set, 5, what="watcher subscribed")
        started = time.monotonic()
        store.cancel(job, "user_requested", "stop", "api")
        assert token.wait(5) is True
        assert time.monotonic() - started < 1
        assert token.source is CancellationSource.API
    finally:
        watcher.stop()


def test_a_cancel_in_another_redis_database_is_not_heard(store):
    """Two deployments on one Redis server, different /db: pub/sub would mix them; the channel doesn't."""
    other_db = os.environ["ANDON_REDIS_URL"].rsplit("/", 1)[0] + "/7"
    other = CancellationStore(redis.Redis.from_url(other_db))
    assert other.channel != store.channel
    watcher = TokenWatcher(store, reconcile_s=30)
    try:
        job = str(uuid.uuid4())
        token = watcher.watch(job)
        wait_for(watcher.connected.is_set, 5, what="watcher subscribed")
        other.cancel(job, "user_requested", "elsewhere", "api")
        assert token.wait(0.3) is False
        store.cancel(job, "timeout", "here", "api")
        assert token.wait(5) is True and token.reason is CancellationReason.TIMEOUT
    finally:
        watcher.stop()
        other.redis.flushdb()


def test_watcher_sees_a_cancel_made_before_it_watched(store):
    job = str(uuid.uuid4())
    store.cancel(job, "system_shutdown", None, "worker_shutdown")
    watcher = TokenWatcher(store, reconcile_s=30)
    try:
        assert watcher.watch(job).reason is CancellationReason.SYSTEM_SHUTDOWN
    finally:
        watcher.stop()


def test_watcher_reconcile_catches_a_cancel_whose_message_was_lost(store):
    job = str(uuid.uuid4())
    watcher = TokenWatcher(store, reconcile_s=0.2)
    try:
        token = watcher.watch(job)
        # write the state without publishing, as if the pub/sub message had been lost
        store.redis.set(f"andon:cancel:{job}", '{"job_id": "%s", "reason": "timeout", "message": null, '
                                               '"source": "deadline", "at": "2026-01-01T00:00:00+00:00"}' % job)
        assert token.wait(5) is True
        assert token.reason is CancellationReason.TIMEOUT
    finally:
        watcher.stop()
