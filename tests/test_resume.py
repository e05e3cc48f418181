"""Resume: a new job reuses every finished item of a cancelled one and runs only the rest."""

from __future__ import annotations

import signal

import pytest
from sqlalchemy import select

from api import service
from db.models import Job
from db.session import session_scope
from db.vocabulary import CancellationReason
from tasks.errors import JobNotFound, NotResumable
from tests.jobs_helpers import (
    items,
    submit,
    wait_items,
    wait_status,
    wait_terminal,
)
from tests.procs import wait_for


def _cancelled(reason=CancellationReason.TIMEOUT, n=20) -> str:
    job_id = submit(n, stage_delay_s=0.02, tags=["batch-7"])
    wait_items(job_id, 4)
    service.cancel_job(job_id, reason)
    assert wait_terminal(job_id).status == "cancelled"
    return job_id


def test_resume_reuses_finished_items_and_never_reruns_them(worker, api_client):
    old = _cancelled()
    kept = {r.index for r in items(old) if r.status == "done"}
    answer = api_client.post(f"/api/jobs/{old}/resume")
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert body["resumed_from"] == old and body["status"] == "pending" and body["job_id"] != old
    new = wait_terminal(body["job_id"])
    assert new.status == "completed" and new.resumed_from == old and new.completed_items == 20
    assert api_client.get(f"/api/jobs/{new.id}").json()["tags"] == ["batch-7"]  # found by the same tag
    rows = items(new.id)
    assert sorted(r.index for r in rows) == list(range(20))
    ran_again = {r.index for r in rows if r.finished_at > new.started_at}  # executed by the new job
    assert ran_again == set(range(20)) - kept  # only the rest ran
    partial = api_client.get(f"/api/jobs/{new.id}/partial-results").json()
    assert partial["status"] == "complete" and len(partial["results"]) == 20


def test_what_can_and_cannot_be_resumed(worker, api_client):
    completed = submit(1)
    wait_terminal(completed)
    answer = api_client.post(f"/api/jobs/{completed}/resume")
    assert answer.status_code == 400 and "only a cancelled job" in answer.json()["detail"]

    running = submit(200, stage_delay_s=0.05)
    wait_status(running, "running")
    assert api_client.post(f"/api/jobs/{running}/resume").status_code == 400
    service.cancel_job(running)

    assert api_client.post("/api/jobs/nope/resume").status_code == 404

    by_user = _cancelled(CancellationReason.USER_REQUESTED, n=10)
    refused = api_client.post(f"/api/jobs/{by_user}/resume")
    assert refused.status_code == 400 and "user_requested" in refused.json()["detail"]
    forced = api_client.post(f"/api/jobs/{by_user}/resume", params={"force": "true"})
    assert forced.status_code == 202
    again = api_client.post(f"/api/jobs/{by_user}/resume", params={"force": "true"})
    assert again.status_code == 400 and "already resumed" in again.json()["detail"]
    wait_terminal(forced.json()["job_id"])
    wait_terminal(running)


def test_resume_errors_from_the_service_layer(worker):
    with pytest.raises(JobNotFound):
        service.resume_job("nope")
    job_id = submit(1)
    wait_terminal(job_id)
    with pytest.raises(NotResumable):
        service.resume_job(job_id)


def test_a_warm_shutdown_is_auto_resumed_exactly_once_when_the_worker_is_back(worker, start_worker):
    w = start_worker(concurrency=1)
    old = submit(60, stage_delay_s=0.02, queue=w.queue)
    wait_items(old, 3)
    w.send_signal(signal.SIGTERM)
    w.proc.wait(20)
    assert wait_terminal(old).cancellation_reason == "system_shutdown"
    # the same worker comes back twice over (two processes with its node name): one resume only
    back = [start_worker(concurrency=1, queue=w.queue, ANDON_AUTO_RESUME="1") for _ in range(2)]
    resumed = wait_for(lambda: _resumed_from(old), 30, what="the auto-resume")
    new = wait_terminal(resumed[0], timeout=60)
    assert new.status == "completed" and new.completed_items == 60
    assert len(_resumed_from(old)) == 1
    assert back  # kept alive until here


def _resumed_from(job_id: str) -> list[str]:
    with session_scope() as session:
        return list(session.scalars(select(Job.id).where(Job.resumed_from == job_id)))
