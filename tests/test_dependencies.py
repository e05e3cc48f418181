"""Parents and children: API parent_job_id, cascading cancels, and Celery chains."""

from __future__ import annotations

from celery.result import AsyncResult

from api import service
from tasks.app import app
from tests.jobs_helpers import (
    assert_one_terminal,
    docs,
    events,
    items,
    job_row,
    submit,
    wait_items,
    wait_terminal,
)
from tests.procs import wait_for


def assert_dependency_failed(job_id: str):
    job = wait_terminal(job_id)
    assert (job.status, job.cancellation_reason, job.cancellation_source) == (
        "cancelled", "dependency_failed", "parent")
    assert job.started_at is None and items(job_id) == []
    assert "started" not in [e.kind for e in events(job_id)]
    assert_one_terminal(job_id)
    return job


def test_a_child_waits_for_its_parent_then_runs(worker):
    parent = submit(10, stage_delay_s=0.02)
    child = submit(2, parent_job_id=parent)
    assert job_row(child).status == "pending" and job_row(child).deferred is True
    parent_job = wait_terminal(parent)
    child_job = wait_terminal(child)
    assert parent_job.status == "completed" and child_job.status == "completed"
    assert child_job.started_at >= parent_job.finished_at


def test_cancelling_a_parent_cascades_to_its_unfinished_children(worker):
    parent = submit(40, stage_delay_s=0.03)
    child = submit(2, parent_job_id=parent)
    grandchild = submit(2, parent_job_id=child)
    wait_items(parent, 2)
    service.cancel_job(parent)
    assert wait_terminal(parent).status == "cancelled"
    assert_dependency_failed(child)
    assert_dependency_failed(grandchild)


def test_no_cascade_leaves_children_to_the_parents_outcome(worker):
    parent = submit(40, stage_delay_s=0.03)
    child = submit(2, parent_job_id=parent)
    wait_items(parent, 2)
    service.cancel_job(parent, cascade=False)
    wait_terminal(parent)
    job = assert_dependency_failed(child)
    # the child was not cancelled by the request ("parent job X was cancelled"), however soon the
    # parent ended: only because the parent ended ("parent job X cancelled")
    assert job.cancellation_message == f"parent job {parent} cancelled"
    assert [e.detail["message"] for e in events(child) if e.kind == "cancel_requested"] == [job.cancellation_message]


def test_a_child_of_a_failed_parent_never_runs(worker):
    parent = submit(documents=["   ", ""])  # every item fails: the job fails
    assert wait_terminal(parent).status == "failed"
    answer = service.submit_job(docs(2), parent_job_id=parent)
    assert answer.status.value == "cancelled"
    assert_dependency_failed(answer.job_id)


def test_an_unknown_parent_is_a_422(api_client):
    answer = api_client.post("/api/jobs", json={"documents": ["a"], "parent_job_id": "nope"})
    assert answer.status_code == 422 and "parent job nope not found" in answer.json()["detail"]


def test_a_chain_whose_middle_step_fails_ends_every_step(worker):
    first, middle, last = service.submit_chain([docs(2), ["  ", ""], docs(2)])
    assert wait_terminal(first).status == "completed"
    assert wait_terminal(middle).status == "failed" and "all 2 items failed" in job_row(middle).error
    assert_dependency_failed(last)
    wait_for(lambda: AsyncResult(middle, app=app).state == "FAILURE", 20)
    wait_for(lambda: AsyncResult(last, app=app).state == "FAILURE", 20)  # never PENDING forever


def test_a_chain_whose_middle_step_is_revoked_ends_every_step(worker):
    first, middle, last = service.submit_chain([docs(2), docs(60), docs(2)], options={"stage_delay_s": 0.02})
    wait_items(middle, 2)
    app.control.revoke(middle)
    assert wait_terminal(first).status == "completed"
    assert wait_terminal(middle).cancellation_source == "revoke"
    assert_dependency_failed(last)
    wait_for(lambda: AsyncResult(last, app=app).state == "REVOKED", 20)


# --- chords: a body job that waits for every header job ------------------------------------------


def test_a_chord_runs_its_body_after_every_header_completes(worker):
    headers, body = service.submit_chord([docs(2), docs(3)], docs(2))
    assert all(wait_terminal(h).status == "completed" for h in headers)
    assert wait_terminal(body).status == "completed"
    assert job_row(body).started_at >= max(job_row(h).finished_at for h in headers)
    wait_for(lambda: AsyncResult(body, app=app).state == "SUCCESS", 20)


def test_a_chord_whose_header_is_cancelled_or_fails_ends_its_body_dependency_failed(worker):
    (slow, quick), body = service.submit_chord([docs(60), docs(2)], docs(2), options={"stage_delay_s": 0.02})
    wait_items(slow, 2)
    service.cancel_job(slow, cascade=False)  # not the cascade: the chord's own dependency rule
    assert wait_terminal(slow).status == "cancelled" and wait_terminal(quick).status == "completed"
    job = assert_dependency_failed(body)
    assert slow in job.cancellation_message
    wait_for(lambda: AsyncResult(body, app=app).state == "FAILURE", 20)  # ChordError: never PENDING forever

    (good, bad), body = service.submit_chord([docs(2), ["  ", ""]], docs(2))
    assert wait_terminal(bad).status == "failed" and wait_terminal(good).status == "completed"
    assert_dependency_failed(body)
    wait_for(lambda: AsyncResult(body, app=app).state == "FAILURE", 20)


def test_bulk_cancel_by_parent_finds_a_chord_body(worker):
    (first, second), body = service.submit_chord([docs(60), docs(60)], docs(2), options={"stage_delay_s": 0.02})
    outcome = service.cancel_matching(parent_job_id=second, message="not needed")
    assert outcome.matched == 1 and outcome.cancelled == 1
    job = wait_terminal(body)
    assert (job.status, job.cancellation_message, job.started_at) == ("cancelled", "not needed", None)
    service.cancel_job(first)
    service.cancel_job(second)
    assert wait_terminal(first).status == wait_terminal(second).status == "cancelled"
    wait_for(lambda: AsyncResult(body, app=app).state in ("FAILURE", "REVOKED"), 20)
