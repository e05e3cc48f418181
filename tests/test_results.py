"""Celery's result agrees with the job row even when the run that should have written it couldn't
(issue 11): a job ended by the reaper after its whole worker vanished, or whose own write was cut by
an outage, gets the state its row implies from a worker's sweep — once its run is gone, idempotently,
whoever sweeps."""

from __future__ import annotations

import os
import signal
import threading
import uuid
from datetime import UTC, datetime

from celery import states
from celery.exceptions import Reject
from celery.result import AsyncResult
from redis.exceptions import ConnectionError as RedisConnectionError

from api import service
from tasks import lifecycle
from tasks.app import app
from tasks.cancellation.keys import heartbeat_key
from tasks.jobs import JobFailed
from tasks.results import ResultSweep
from tests.jobs_helpers import job_row, submit, wait_items, wait_status, wait_terminal, while_sweeping
from tests.procs import wait_for

FAST = {"ANDON_HEARTBEAT_S": "0.3", "ANDON_BROKER_SWEEP_S": "0.5", "ANDON_RESULT_SETTLE_AFTER_S": "1"}


def celery_state(job_id: str) -> str:
    return AsyncResult(job_id, app=app).state


def sweep_through(sweep: ResultSweep) -> list[str]:
    """Passes until the rescan wraps: every row in the window looked at once (the first pass reads
    the newest ``batch`` of it, the rescan the rest)."""
    settled = sweep.run()
    while sweep.cursor is not None:
        settled += sweep.run()
    return settled


def test_a_job_the_reaper_ends_after_its_worker_vanished_shows_revoked_with_its_reason(start_worker, redis_client):
    gone = start_worker(concurrency=1, ANDON_HEARTBEAT_S="0.3")
    job_id = submit(200, stage_delay_s=0.03, queue=gone.queue)
    wait_items(job_id, 2)
    assert celery_state(job_id) == states.STARTED
    os.killpg(gone.proc.pid, signal.SIGKILL)  # main process and child: nobody writes REVOKED
    gone.proc.wait(10)
    assert service.cancel_job(job_id, message="stop it").status.value == "cancelling"
    start_worker(concurrency=1, **FAST)  # another queue: it reaps and sweeps, never runs the job
    job = wait_terminal(job_id, timeout=60)
    assert job.status == "cancelled" and job.cancellation_reason == "user_requested"
    while_sweeping(lambda: celery_state(job_id) == states.REVOKED, 60, what="the sweep to write REVOKED")
    assert "user_requested (api): stop it" in str(AsyncResult(job_id, app=app).result)


def test_a_completed_job_whose_success_was_lost_to_a_redis_outage_shows_success(start_worker, redis_client):
    w = start_worker(concurrency=1, **FAST)
    job_id = submit(2, queue=w.queue)
    assert wait_terminal(job_id, timeout=60).status == "completed"
    wait_for(lambda: celery_state(job_id) == states.SUCCESS, 20)
    # what Celery stores when Redis was away as the job returned: the outage as the task's FAILURE
    AsyncResult(job_id, app=app).forget()
    app.backend.store_result(job_id, RedisConnectionError("Error 111 connecting. Connection refused."), states.FAILURE)
    while_sweeping(lambda: celery_state(job_id) == states.SUCCESS, 60, what="the sweep to write SUCCESS")


def test_a_failure_celery_stored_for_a_cancelled_job_becomes_revoked_and_a_failed_jobs_own_stays(
        redis_client, database):
    cancelled = service.submit_job(["a"], pipeline="user-sync", queue=f"q-none-{uuid.uuid4().hex[:8]}").job_id
    assert service.cancel_job(cancelled).status.value == "cancelled"
    # what Celery stores when the broker takes no retry of a delivery deferred during a Redis outage
    app.backend.store_result(cancelled, Reject("Error 111 connecting. Connection refused.", requeue=False),
                             states.FAILURE)
    failed = service.submit_job(["a"], pipeline="user-sync", queue=f"q-none-{uuid.uuid4().hex[:8]}").job_id
    assert lifecycle.end_failed(failed, "no worker knows this job's pipeline")
    app.backend.store_result(failed, JobFailed("no worker knows this job's pipeline: its own words"), states.FAILURE)
    settled = sweep_through(ResultSweep(grace_s=0))
    assert cancelled in settled and celery_state(cancelled) == states.REVOKED
    assert failed not in settled and "its own words" in str(AsyncResult(failed, app=app).result)


def test_a_live_run_keeps_its_result_and_two_sweeps_racing_write_the_same_state(redis_client, database):
    job_id = service.submit_job(["a"], pipeline="user-sync", queue=f"q-none-{uuid.uuid4().hex[:8]}").job_id
    assert service.cancel_job(job_id, message="racing").status.value == "cancelled"
    wait_status(job_id, "cancelled")
    app.backend.store_result(job_id, {"pid": 1, "hostname": "w"}, states.STARTED)
    redis_client.set(heartbeat_key(job_id), "1", ex=30)  # its run still beats: it writes its own end
    assert job_id not in sweep_through(ResultSweep(grace_s=0))
    assert celery_state(job_id) == states.STARTED
    redis_client.delete(heartbeat_key(job_id))

    settled: list[list[str]] = []
    sweeps = [threading.Thread(target=lambda: settled.append(sweep_through(ResultSweep(grace_s=0))))
              for _ in range(2)]
    for t in sweeps:
        t.start()
    for t in sweeps:
        t.join(30)
    assert any(job_id in ids for ids in settled)
    assert celery_state(job_id) == states.REVOKED
    assert "user_requested (api): racing" in str(AsyncResult(job_id, app=app).result)
    assert job_id not in sweep_through(ResultSweep(grace_s=0))  # settled: nothing more to write
    assert job_row(job_id).status == "cancelled"


def test_a_new_end_is_settled_before_the_backlog_and_the_rescan_reaches_every_older_one(database):
    def ended_with_a_stale_state() -> str:
        job_id = service.submit_job(["a"], pipeline="user-sync", queue=f"q-none-{uuid.uuid4().hex[:8]}").job_id
        assert service.cancel_job(job_id).status.value == "cancelled"
        app.backend.store_result(job_id, {"pid": 1, "hostname": "gone"}, states.STARTED)
        return job_id

    backlog = [ended_with_a_stale_state() for _ in range(7)]
    first = job_row(backlog[0]).finished_at
    window_s = (datetime.now(UTC) - (first if first.tzinfo else first.replace(tzinfo=UTC))).total_seconds() + 2
    sweep = ResultSweep(grace_s=0, window_s=window_s, batch=3)
    assert backlog[-1] in sweep.run()  # the newest first, not the oldest three
    assert celery_state(backlog[0]) == states.STARTED
    newer = ended_with_a_stale_state()
    assert newer in sweep.run()  # new since the last pass: ahead of the backlog still waiting
    for _ in range(10):
        if all(celery_state(job_id) == states.REVOKED for job_id in backlog):
            break
        sweep.run()
    assert [celery_state(job_id) for job_id in backlog] == [states.REVOKED] * len(backlog)
