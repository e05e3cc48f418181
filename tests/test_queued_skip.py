"""A job cancelled while queued is skipped in the worker's main process (tasks/strategy.py): it never
starts, Celery says REVOKED, and no pool process ran it — on Redis and on RabbitMQ."""

from __future__ import annotations

import signal
import threading
import time
import uuid

from celery.result import AsyncResult
from kombu import Consumer, Queue
from kombu.utils.json import loads
from sqlalchemy import func, select

from api import service
from db import jobs as job_rows
from db.models import JobEvent
from db.session import session_scope
from db.vocabulary import CancellationReason, JobStatus
from tasks.app import app
from tasks.cancellation import CancelRequest
from tasks.lookahead import take_cancelled_run
from tasks.process import get_queued_cancels, get_redis, get_store
from tasks.results import ResultSweep
from tasks.sending import enqueue_many
from tests.jobs_helpers import docs, events, job_row, submit, wait_status, wait_terminal
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


def _queue(n: int, queue: str, tag: str | None = None) -> list[str]:
    """``n`` one-item jobs queued on ``queue`` in one go, as a batch submit makes them."""
    jobs = [{"id": str(uuid.uuid4()), "inputs": docs(1), "options": {}, "pipeline": "documents", "queue": queue,
             "tags": [tag] if tag else []} for _ in range(n)]
    with session_scope() as session:
        job_rows.create_jobs(session, jobs, actor="test")
    enqueue_many([(job["id"], {}, queue) for job in jobs], [])
    return [job["id"] for job in jobs]


def _queued_ids(queue: str) -> list[str]:
    """The job ids of a queue's messages, the next one to be taken first."""
    return [loads(raw)["headers"]["id"] for raw in reversed(get_redis().lrange(queue, 0, -1))]


def test_a_look_ahead_takes_only_the_run_it_decided_on_and_passes_over_what_another_worker_took(database,
                                                                                               redis_client):
    queue = f"q-ahead-{uuid.uuid4().hex[:8]}"
    priority = f"{queue}\x06\x163"  # kombu's list for priority 3 of this queue
    urgent = _queue(2, queue)
    for _ in urgent:
        redis_client.lmove(queue, priority, "RIGHT", "LEFT")
    base = _queue(10, queue)
    live = base[6]
    cancelled = {*base, *urgent} - {live}
    with app.connection() as conn:
        channel = conn.default_channel
        Consumer(channel, queues=[Queue(queue)], accept=["json"]).consume()  # the queue is one the channel consumes
        message = channel.Message(loads(redis_client.rpop(queue)), channel=channel)  # base[0], as BRPOP takes it
        decided: list[str] = []

        def skippable(candidate) -> str | None:
            if not decided:  # another worker takes the next message while this one decides
                redis_client.rpop(queue)
            job_id = candidate.headers["id"]
            decided.append(job_id)
            return job_id if job_id in cancelled else None

        taken = take_cancelled_run(message, skippable)
    # decided on base[1:6] (base[6] is live), then on the priority list's two; base[1] was gone
    assert decided == [*base[1:7], *urgent]
    assert taken == [*base[2:6], *urgent]
    assert _queued_ids(queue) == base[6:] and redis_client.llen(priority) == 0


def test_a_run_of_cancelled_messages_is_taken_at_once_around_live_jobs_and_a_chain(start_worker):
    """Live jobs and a chain interleaved with cancelled messages: the cancelled ones are taken in runs
    (never started, REVOKED, a task-revoked event each); the live ones run in their order; a chain's
    message, cancelled too, goes Celery's own way and does not start."""
    w = start_worker(concurrency=1)
    flower_saw: set[str] = set()
    stop_listening = _listen_for_revoked_events(flower_saw)
    blocker = submit(500, stage_delay_s=0.05, queue=w.queue)
    wait_status(blocker, "running")
    tag = f"run-{uuid.uuid4().hex[:8]}"
    cancelled: list[str] = []
    live: list[str] = []
    for _ in range(3):
        cancelled += _queue(60, w.queue, tag)
        live.append(submit(1, queue=w.queue))
    chain = service.submit_chain([docs(1), docs(1)], queue=w.queue)
    cancelled += _queue(60, w.queue, tag)
    assert service.cancel_matching(JobStatus.PENDING, tag=tag).cancelled == len(cancelled)
    assert service.cancel_job(chain[0]).status is JobStatus.CANCELLED
    service.cancel_job(blocker)
    wait_terminal(blocker)
    wait_for(lambda: all(_revoked_in_main_process(j) for j in cancelled), 60, interval=0.2,
             what="every cancelled message answered REVOKED by the main process")
    ran = [wait_terminal(j) for j in live]
    assert [j.status for j in ran] == ["completed"] * 3
    assert [j.started_at for j in ran] == sorted(j.started_at for j in ran)
    assert _started(cancelled) == 0 and {job_row(j).status for j in cancelled} == {"cancelled"}
    head = wait_terminal(chain[0])
    assert (head.status, head.started_at) == ("cancelled", None)
    logs = w.logs()
    assert f"{chain[0]}] received" in logs  # the chain's message went Celery's way
    assert "cancelled messages of" in logs  # ... and the others were taken in runs
    assert get_redis().llen(w.queue) == 0
    wait_for(lambda: set(cancelled) <= flower_saw, 10, what="a task-revoked event for each")
    stop_listening.set()


def test_a_worker_killed_mid_drain_loses_no_live_job_and_no_cancelled_one_starts(start_worker):
    """A worker SIGKILLed while it takes runs of cancelled messages: the live jobs behind them run on
    its restart, no cancelled job starts, and a REVOKED the killed worker never wrote is written by
    the result sweep (tasks/results.py)."""
    w = start_worker(concurrency=1)
    blocker = submit(500, stage_delay_s=0.05, queue=w.queue)
    wait_status(blocker, "running")
    tag = f"kill-{uuid.uuid4().hex[:8]}"
    cancelled = _queue(1000, w.queue, tag)
    live = [submit(1, queue=w.queue) for _ in range(3)]
    assert service.cancel_matching(JobStatus.PENDING, tag=tag).cancelled == len(cancelled)
    queued = get_redis().llen(w.queue)
    service.cancel_job(blocker)
    wait_for(lambda: get_redis().llen(w.queue) < queued - 1, 30, interval=0.001, what="a run to be taken")
    w.send_signal(signal.SIGKILL)
    w.proc.wait(10)
    start_worker(concurrency=1, queue=w.queue)  # the same node, restarted
    assert [wait_terminal(j, timeout=60).status for j in live] == ["completed"] * 3
    wait_for(lambda: get_redis().llen(w.queue) == 0, 30, what="the rest drained")
    assert _started(cancelled) == 0 and {job_row(j).status for j in cancelled} == {"cancelled"}
    sweep = ResultSweep(grace_s=0)
    wait_for(lambda: sweep.run() is not None and all(
        AsyncResult(j, app=app).state == "REVOKED" for j in cancelled), 30, interval=0.5,
        what="every cancelled job REVOKED, by the skip or by the result sweep")
