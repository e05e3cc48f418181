"""A job cancelled while queued is skipped in the worker's main process (tasks/strategy.py): it never
starts, Celery says REVOKED, and no pool process ran it — on Redis and on RabbitMQ."""

from __future__ import annotations

import threading
import time

from celery.result import AsyncResult
from sqlalchemy import func, select

from api import service
from db.models import JobEvent
from db.session import session_scope
from db.vocabulary import CancellationReason, JobStatus
from tasks.app import app
from tasks.cancellation import CancelRequest
from tasks.process import get_queued_cancels, get_redis, get_store
from tests.jobs_helpers import events, job_row, submit, wait_status, wait_terminal
from tests.procs import wait_for

#: what the main process stores as the REVOKED reason (a pool process would store the job's reason)
SKIPPED = "cancelled while queued"


def _revoked_in_main_process(job_id: str) -> bool:
    result = AsyncResult(job_id, app=app)
    return result.state == "REVOKED" and SKIPPED in str(result.result)


def _started(job_ids: list[str]) -> int:
    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(JobEvent).where(
            JobEvent.job_id.in_(job_ids), JobEvent.kind == "started"))


def test_queued_cancels_are_pushed_to_a_main_process_and_reconciled(store):
    feed = get_queued_cancels().start()
    assert feed.connected.wait(10)
    job_id = f"queued-{time.time_ns()}"
    store.apply(job_id, CancelRequest(CancellationReason.USER_REQUESTED), queued=True)
    wait_for(lambda: job_id in feed, 5, what="the push")
    bulk = [f"bulk-{i}-{time.time_ns()}" for i in range(50)]
    store.cancel_many(bulk, CancellationReason.TIMEOUT, None, None)
    wait_for(lambda: all(j in feed for j in bulk), 5, what="the bulk push")
    running = f"running-{time.time_ns()}"
    store.apply(running, CancelRequest(CancellationReason.USER_REQUESTED))  # not queued: not skipped
    time.sleep(0.2)
    assert running not in feed
    # a push lost: the reconcile reads the sorted set
    late = f"late-{time.time_ns()}"
    get_redis().zadd(store.queued_key, {late: time.time()})
    feed.reconcile()
    assert late in feed


def _listen_for_revoked_events(seen: set[str]) -> threading.Event:
    """What Flower does: receive the workers' task events (here only `task-revoked`) until set."""
    stop = threading.Event()

    def listen() -> None:
        with app.connection() as conn:
            receiver = app.events.Receiver(conn, handlers={"task-revoked": lambda event: seen.add(event["uuid"])})
            while not stop.is_set():
                try:
                    for _ in receiver.itercapture(limit=None, timeout=0.5, wakeup=False):
                        if stop.is_set():
                            return
                except TimeoutError:  # no event for a while
                    continue
                except Exception:  # the broker going away at the end
                    return

    threading.Thread(target=listen, daemon=True).start()
    time.sleep(0.5)  # its queue bound before the events flow
    return stop


def test_a_job_cancelled_while_queued_is_skipped_without_a_pool_process(start_worker):
    w = start_worker(concurrency=1)
    flower_saw: set[str] = set()
    stop_listening = _listen_for_revoked_events(flower_saw)
    blocker = submit(500, stage_delay_s=0.05, queue=w.queue)
    wait_status(blocker, "running")
    one = submit(1, queue=w.queue)
    bulk = [submit(1, queue=w.queue, tags=["skip-test"]) for _ in range(40)]
    assert service.cancel_job(one).status is JobStatus.CANCELLED
    assert service.cancel_matching(JobStatus.PENDING, tag="skip-test").cancelled == 40
    service.cancel_job(blocker)
    wait_terminal(blocker)
    queued = [one, *bulk]
    wait_for(lambda: all(_revoked_in_main_process(j) for j in queued), 60, interval=0.2,
             what="the main process to answer every cancelled message REVOKED")
    assert get_redis().llen(w.queue) == 0 and _started(queued) == 0
    assert {job_row(j).status for j in queued} == {"cancelled"}
    assert [e.kind for e in events(one)].count("cancel_requested") == 1
    assert f"{one}] received" not in w.logs()  # Celery's own handler never saw it
    wait_for(lambda: set(queued) <= flower_saw, 10, what="a task-revoked event for each (Flower shows REVOKED)")
    stop_listening.set()


def test_a_pending_row_whose_cancel_never_reached_the_database_is_ended_after_the_skip(start_worker):
    """The request set the token and died: the message is skipped, and the row, still `pending`,
    is ended `cancelled` with the token's reason by the main process's batched look at the rows."""
    w = start_worker(concurrency=1)
    blocker = submit(500, stage_delay_s=0.05, queue=w.queue)
    wait_status(blocker, "running")
    orphan = submit(1, queue=w.queue)
    get_store().apply(orphan, CancelRequest(CancellationReason.TIMEOUT, "token only", actor="gone"),
                      queued=True)
    service.cancel_job(blocker)
    wait_terminal(blocker)
    job = wait_terminal(orphan, timeout=30)
    assert (job.status, job.cancellation_reason, job.cancellation_message) == ("cancelled", "timeout", "token only")
    assert _revoked_in_main_process(orphan) and _started([orphan]) == 0
    assert [(e.kind, e.actor) for e in events(orphan) if e.kind == "cancel_requested"] == [("cancel_requested", "gone")]
