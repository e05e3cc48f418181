"""Jobs on a real prefork worker: cancel mid-way, queued cancel, failing items, races, cleanup."""

from __future__ import annotations

import uuid

from celery.result import AsyncResult

from api import service
from db.settings import get_settings
from db.vocabulary import JobStatus
from tasks.app import app
from tests.jobs_helpers import (
    assert_one_terminal,
    docs,
    events,
    items,
    job_row,
    submit,
    wait_items,
    wait_status,
    wait_terminal,
)
from tests.procs import wait_for


def test_a_job_runs_every_item_through_every_stage(worker):
    job_id = submit(6)
    job = wait_terminal(job_id)
    assert job.status == "completed" and job.completed_items == 6 and job.failed_items == 0
    rows = items(job_id)
    assert [r.index for r in rows] == list(range(6))
    assert all(r.stage == "analyze" and r.status == "done" and r.result["keywords"] for r in rows)
    assert [e.kind for e in events(job_id)] == ["submitted", "started", "completed"]
    assert AsyncResult(job_id, app=app).get(timeout=10)["status"] == "completed"
    assert not (get_settings().jobs_tmp_dir / job_id).exists()


def test_running_job_cancelled_keeps_finished_items_and_stops_at_a_checkpoint(worker):
    job_id = submit(30, stage_delay_s=0.03)
    wait_items(job_id, 3)
    service.cancel_job(job_id, message="enough")
    job = wait_terminal(job_id)

    assert job.status == "cancelled"
    assert job.cancellation_reason == "user_requested" and job.cancellation_source == "api"
    assert job.cancellation_message == "enough"
    assert 3 <= job.completed_items < job.total_items
    partial = service.partial_results(job_id)
    assert partial.status == "partial" and partial.completed_items == job.completed_items
    assert [r["index"] for r in partial.results] == list(range(job.completed_items))
    assert partial.cancelled_at_item == job.completed_items
    # nothing finished after the cancel was observed, and every stored item is whole
    assert all(r.finished_at <= job.cancel_observed_at for r in items(job_id))
    assert job.cancel_requested_at <= job.cancel_observed_at <= job.finished_at
    kinds = [e.kind for e in events(job_id)]
    assert kinds[-3:] == ["cancel_requested", "cancel_observed", "cancelled"]
    assert_one_terminal(job_id)
    assert not (get_settings().jobs_tmp_dir / job_id).exists()
    # Celery stores REVOKED when the task returns, a moment after the row is terminal
    wait_for(lambda: AsyncResult(job_id, app=app).state == "REVOKED", 20, what="REVOKED in the backend")


def test_a_queued_job_cancelled_behind_a_busy_worker_never_starts(worker):
    blockers = [submit(200, stage_delay_s=0.05) for _ in range(2)]  # occupy both pool processes
    for blocker in blockers:
        wait_status(blocker, "running")
    queued = submit(3)
    assert job_row(queued).status == "pending"
    answer = service.cancel_job(queued)
    assert answer.status is JobStatus.CANCELLED
    for blocker in blockers:
        service.cancel_job(blocker)
    for blocker in blockers:
        wait_terminal(blocker)
    # the worker now receives the queued job: it must skip it without running a stage, and Celery
    # must record it as REVOKED, not SUCCESS
    wait_for(lambda: AsyncResult(queued, app=app).state == "REVOKED", 20, what="REVOKED in the backend")
    job = assert_one_terminal(queued)
    assert job.status == "cancelled" and job.started_at is None and job.completed_items == 0
    assert items(queued) == []
    assert "started" not in [e.kind for e in events(queued)]


def test_a_failing_item_is_recorded_and_the_job_goes_on(worker):
    documents = docs(5)
    documents[2] = "   "
    job_id = submit(documents=documents)
    job = wait_terminal(job_id)
    assert job.status == "completed" and job.completed_items == 4 and job.failed_items == 1
    partial = service.partial_results(job_id)
    assert partial.status == "complete"
    assert [(f.index, f.stage) for f in partial.failed_items] == [(2, "parse")]
    assert "empty document" in partial.failed_items[0].error


def test_cancel_racing_completion_ends_in_exactly_one_terminal_state(worker):
    job_ids = [submit(1) for _ in range(40)]
    for job_id in job_ids:
        try:
            service.cancel_job(job_id)
        except Exception as exc:  # the job may already have completed: that's a fair loss
            assert "already completed" in str(exc)
    outcomes = {}
    for job_id in job_ids:
        wait_terminal(job_id)
        job = assert_one_terminal(job_id)
        outcomes[job.status] = outcomes.get(job.status, 0) + 1
        if job.status == "cancelled":
            assert job.cancellation_reason == "user_requested"
        else:  # the cancel lost to completion: no reason is left on the row
            assert job.status == "completed" and job.completed_items == 1 and job.cancellation_reason is None
    assert set(outcomes) <= {"cancelled", "completed"}


def test_other_services_can_send_task_by_name_without_importing_andon(worker):
    job_id = str(uuid.uuid4())
    app.send_task("andon.analyze_documents", kwargs={"documents": docs(2)}, task_id=job_id)
    job = wait_terminal(job_id)
    assert job.status == "completed" and job.total_items == 2
    assert events(job_id)[0].actor == "send_task"
