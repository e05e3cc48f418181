"""The group commit of finished items (``ANDON_ITEM_COMMIT_WINDOW_MS``, tasks/commits.py), held to
its promises with real workers: an item is durable within the window of ending, and always before
the job's terminal row, before its cancel is observed and before a warm shutdown's exit; a SIGKILL
loses at most the window, and the redelivery redoes it; a run that lost its job has its whole batch
refused.

The workers here use a long window (½–1 s) so that items really sit in it when the job stops.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from sqlalchemy import func, select, update

from api import service
from db import jobs as job_rows
from db.models import Job, JobItem
from db.session import session_scope, transaction
from db.vocabulary import ItemStatus, JobStatus
from tasks import lifecycle
from tasks.cancellation.keys import heartbeat_key
from tasks.process import get_redis
from tests.jobs_helpers import assert_one_terminal, events, items, job_row, wait_terminal
from tests.procs import wait_for

FAST = {"ANDON_HEARTBEAT_S": "0.1"}  # the heartbeat says which item the job is at, ten times a second


def submit_paced(waits: list[float], queue: str) -> str:
    return service.submit_job([{"wait_s": w} for w in waits], {}, pipeline="user-paced", queue=queue).job_id


def wait_at_item(job_id: str, index: int, timeout: float = 30) -> None:
    """Until the job's heartbeat says it works on item ``index``."""
    def there():
        beat = get_redis().get(heartbeat_key(job_id))
        return beat is not None and json.loads(beat)["item"] == index
    wait_for(there, timeout, interval=0.01, what=f"job {job_id} at item {index}")


def durable(job_id: str) -> set[int]:
    with session_scope() as session:
        return set(session.scalars(select(JobItem.index).where(JobItem.job_id == job_id,
                                                               JobItem.status == ItemStatus.DONE.value)))


def test_an_item_is_committed_within_the_window_while_the_job_runs_on(start_worker):
    w = start_worker(concurrency=1, ANDON_ITEM_COMMIT_WINDOW_MS="300", **FAST)
    job_id = submit_paced([0, 60], w.queue)
    wait_for(lambda: durable(job_id) == {0}, 20, what="item 0 committed while item 1 still runs")
    assert job_row(job_id).status == "running" and job_row(job_id).completed_items == 1
    service.cancel_job(job_id)
    job = wait_terminal(job_id)
    assert job.status == "cancelled" and job.cancelled_at_item == 1
    assert [(r.index, r.status) for r in items(job_id)] == [(0, "done"), (1, "interrupted")]


def test_every_item_is_durable_before_the_terminal_row(start_worker):
    w = start_worker(concurrency=1, ANDON_ITEM_COMMIT_WINDOW_MS="1000")
    job_ids = [submit_paced([0] * 40, w.queue) for _ in range(3)]
    seen_terminal = 0
    deadline = time.monotonic() + 60
    while seen_terminal < len(job_ids) and time.monotonic() < deadline:
        seen_terminal = 0
        for job_id in job_ids:
            with session_scope() as session:  # one statement: the row and its items as of one moment
                stored_items = select(func.count()).select_from(JobItem).where(JobItem.job_id == job_id)
                status, completed, stored = session.execute(
                    select(Job.status, Job.completed_items, stored_items.scalar_subquery())
                    .where(Job.id == job_id)).one()
            assert stored == completed  # the counter moves with its items, batch by batch
            if JobStatus(status).is_terminal:
                assert status == "completed" and stored == 40, (status, stored)
                seen_terminal += 1
        time.sleep(0.005)
    assert seen_terminal == len(job_ids)
    for job_id in job_ids:
        assert_one_terminal(job_id)


def test_items_in_the_window_are_durable_before_the_cancel_is_observed(start_worker):
    w = start_worker(concurrency=1, ANDON_ITEM_COMMIT_WINDOW_MS="1000", **FAST)
    job_id = submit_paced([0, 0, 0, 60], w.queue)
    wait_at_item(job_id, 3)
    service.cancel_job(job_id)
    job = wait_terminal(job_id)
    assert job.status == "cancelled" and job.cancelled_at_item == 3 and job.completed_items == 3
    assert [(r.index, r.status) for r in items(job_id)] == [(0, "done"), (1, "done"), (2, "done"),
                                                             (3, "interrupted")]
    observed = [e for e in events(job_id) if e.kind == "cancel_observed"]
    assert len(observed) == 1 and observed[0].detail["item"] == 3


def test_a_warm_shutdown_writes_the_items_still_in_the_window(start_worker):
    w = start_worker(concurrency=1, ANDON_ITEM_COMMIT_WINDOW_MS="1000", **FAST)
    job_id = submit_paced([0, 0, 0, 60], w.queue)
    wait_at_item(job_id, 3)
    w.send_signal(signal.SIGTERM)
    w.proc.wait(timeout=30)
    job = wait_terminal(job_id)
    assert (job.status, job.cancellation_reason, job.cancellation_source) == (
        "cancelled", "system_shutdown", "worker_shutdown")
    assert durable(job_id) == {0, 1, 2} and job.completed_items == 3 and job.resumable


def test_a_sigkill_loses_at_most_the_window_and_the_redelivery_redoes_it(start_worker):
    window_s = 0.5
    w = start_worker(concurrency=1, ANDON_ITEM_COMMIT_WINDOW_MS=str(int(window_s * 1000)), **FAST)
    # items 0 and 1 end four windows before item 2 does; item 3 ends just before the kill
    job_id = submit_paced([0, 0, 4 * window_s, 0, 3.0], w.queue)
    wait_at_item(job_id, 4)
    os.kill(w.child_pids()[0], signal.SIGKILL)
    assert {0, 1} <= durable(job_id)  # older than the window: already committed
    job = wait_terminal(job_id, timeout=60)
    assert job.status == "completed" and job.completed_items == 5
    assert [r.index for r in items(job_id)] == [0, 1, 2, 3, 4]  # what the kill lost ran again, nothing twice
    kinds = [e.kind for e in events(job_id)]
    assert kinds.count("requeued") == 1 and kinds.count("started") == 2
    assert_one_terminal(job_id)


def test_a_run_that_lost_its_job_has_its_whole_batch_refused(start_worker):
    w = start_worker(concurrency=1, ANDON_ITEM_COMMIT_WINDOW_MS="1000", **FAST)
    job_id = submit_paced([0, 0, 0, 1.5, 60], w.queue)
    wait_at_item(job_id, 3)
    with session_scope() as session:  # another run takes the job over; what this one holds is stale
        session.execute(update(Job).where(Job.id == job_id).values(fence=Job.fence + 1, owner="another run"))
        kept = session.scalar(select(func.count()).select_from(JobItem).where(JobItem.job_id == job_id))
    try:
        wait_for(lambda: "duplicate_skipped" in [e.kind for e in events(job_id)], 30,
                 what="the stale run to find out and stop")
        job = job_row(job_id)
        assert len(items(job_id)) == kept and job.completed_items == kept  # nothing of its batch got in
        assert job.status == "running" and job.owner == "another run"
        assert "taken over by another run" in w.logs()
    finally:
        lifecycle.end_failed(job_id, "test over")


@pytest.mark.parametrize("stale", [ItemStatus.DONE, ItemStatus.INTERRUPTED])
def test_a_stale_batch_is_refused_whole_by_the_fence(db_url, stale):
    from db.session import session_scope as scope

    job_id = "batch-" + os.urandom(4).hex()
    with scope(db_url) as session:
        job_rows.create_job(session, job_id, ["a", "b", "c", "d"], {})
        assert job_rows.transition(session, job_id, JobStatus.RUNNING, raise_fence=True, owner="first")
    batch = [job_rows.ItemRow(0, "s", ItemStatus.DONE, result={"ok": 0}),
             job_rows.ItemRow(1, "s", ItemStatus.FAILED, error="bad")]
    with transaction(db_url) as conn:
        job_rows.record_items(conn, job_id, batch, fence=1)
    with scope(db_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(fence=Job.fence + 1))
    stale_batch = [job_rows.ItemRow(2, "s", ItemStatus.DONE, result={"ok": 2}), job_rows.ItemRow(3, "s", stale)]
    with pytest.raises(job_rows.NotOwner), transaction(db_url) as conn:
        job_rows.record_items(conn, job_id, stale_batch, fence=1)
    with scope(db_url) as session:
        job = session.get(Job, job_id)
        assert (job.completed_items, job.failed_items) == (1, 1)
        assert sorted(session.scalars(select(JobItem.index).where(JobItem.job_id == job_id))) == [0, 1]



@pytest.mark.parametrize("owner", ["this run", "a stale run"])
def test_a_run_through_writes_its_last_items_and_its_end_together(database, owner):
    """A job that ran through writes the items still in its window in its terminal row's own
    transaction: both, or — for a run that lost the job — neither."""
    job_id = service.submit_job(["a", "b", "c"], {}, queue="nobody-serves-this").job_id
    with session_scope() as session:
        assert job_rows.transition(session, job_id, JobStatus.RUNNING, raise_fence=True, owner="test")
        fence = session.scalar(select(Job.fence).where(Job.id == job_id))
    with transaction() as conn:
        job_rows.record_items(conn, job_id, [job_rows.ItemRow(0, "s", ItemStatus.DONE, result={"ok": 0})],
                              fence=fence)
    last = [job_rows.ItemRow(1, "s", ItemStatus.DONE, result={"ok": 1}),
            job_rows.ItemRow(2, "s", ItemStatus.FAILED, error="bad")]
    if owner == "this run":
        assert lifecycle.finish_ran_through(job_id, fence, counts=(3, 2), items=last).status is JobStatus.COMPLETED
        expected = ("completed", 2, 1, [0, 1, 2])
    else:
        with session_scope() as session:  # another run took the job over
            session.execute(update(Job).where(Job.id == job_id).values(fence=Job.fence + 1))
        with pytest.raises(job_rows.NotOwner):
            lifecycle.finish_ran_through(job_id, fence, counts=(3, 2), items=last)
        expected = ("running", 1, 0, [0])
    job = job_row(job_id)
    assert (job.status, job.completed_items, job.failed_items, sorted(r.index for r in items(job_id))) == expected
    if owner == "this run":
        assert_one_terminal(job_id)
    else:
        lifecycle.end_failed(job_id, "test over")
