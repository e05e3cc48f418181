"""Supersede by key: a new submit with a key cancels the tenant's unfinished jobs with that key
(reason user_requested, source superseded, a message naming the new job); the newest always wins."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import httpx
from sqlalchemy import select

from api import service
from db.models import Job, SupersedeKey
from db.session import session_scope
from tests.jobs_helpers import TERMINAL, docs, events, job_row, submit, wait_items, wait_status, wait_terminal

ANDON = str(Path(sys.executable).parent / "andon")


def _key() -> str:
    return f"conversation:{uuid.uuid4().hex[:8]}"


def _jobs_with(key: str) -> list[Job]:
    with session_scope() as session:
        return list(session.scalars(select(Job).where(Job.supersede_key == key).order_by(Job.created_at)))


def assert_superseded(job_id: str, by: str) -> Job:
    job = wait_terminal(job_id)
    assert (job.status, job.cancellation_reason, job.cancellation_source) == (
        "cancelled", "user_requested", "superseded")
    assert job.cancellation_message == f"superseded by job {by}"
    requested = [e for e in events(job_id) if e.kind == "cancel_requested"]
    assert [e.source for e in requested] == ["superseded"]
    return job


def test_a_submit_supersedes_a_running_job_with_its_key(api_client):
    key = _key()
    body = {"documents": docs(40), "options": {"stage_delay_s": 0.03}, "supersede_key": key}
    first = api_client.post("/api/jobs", json=body).json()["job_id"]
    wait_items(first, 2)
    answer = api_client.post("/api/jobs", json={"documents": docs(2), "supersede_key": key})
    assert answer.status_code == 202, answer.text
    second = answer.json()["job_id"]
    old = assert_superseded(first, by=second)
    assert 2 <= old.completed_items < 40  # what it finished is kept
    assert wait_terminal(second).status == "completed"
    shown = api_client.get(f"/api/jobs/{first}").json()
    assert shown["cancellation_source"] == "superseded" and second in shown["cancellation_message"]


def test_a_queued_job_is_superseded_before_it_runs(worker):
    key = _key()
    parent = submit(400, stage_delay_s=0.03)  # holds the queued job back: it waits for its parent
    queued = service.submit_job(docs(2), parent_job_id=parent, supersede_key=key).job_id
    newer = service.submit_job(docs(2), supersede_key=key).job_id
    job = assert_superseded(queued, by=newer)
    assert job.started_at is None
    assert wait_terminal(newer).status == "completed"
    service.cancel_job(parent)  # still running: 400 items take far longer than this test


def test_only_the_same_tenants_unfinished_jobs_with_the_key_are_superseded(worker):
    key = _key()
    done = submit(1, tenant="acme", supersede_key=key)
    assert wait_terminal(done).status == "completed"
    acme = submit(40, stage_delay_s=0.03, tenant="acme", supersede_key=key)
    globex = submit(40, stage_delay_s=0.03, tenant="globex", supersede_key=key)
    other_key = submit(40, stage_delay_s=0.03, tenant="acme", supersede_key=_key())
    newer = submit(1, tenant="acme", supersede_key=key)
    assert_superseded(acme, by=newer)
    assert job_row(done).cancellation_source is None  # finished jobs are left alone
    for job_id in (globex, other_key):
        assert job_row(job_id).status in ("pending", "running")
        service.cancel_job(job_id)


def test_racing_submits_with_one_key_leave_exactly_one_job_unfinished(api_server):
    key, racers = _key(), 8
    body = {"documents": docs(30), "options": {"stage_delay_s": 0.05}, "supersede_key": key}
    answers: list[httpx.Response] = []
    start = threading.Barrier(racers)

    def race() -> None:
        with httpx.Client(base_url=api_server, timeout=30) as client:
            start.wait()
            answers.append(client.post("/api/jobs", json=body))

    threads = [threading.Thread(target=race) for _ in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [a.status_code for a in answers] == [202] * racers, [a.text for a in answers]
    job_ids = {a.json()["job_id"] for a in answers}
    assert len(job_ids) == racers
    with session_scope() as session:
        newest = session.get(SupersedeKey, ("", key)).job_id
    assert newest in job_ids
    for job_id in job_ids - {newest}:  # every older one ends, superseded by a newer one
        job = wait_terminal(job_id)
        assert (job.cancellation_source, job.cancellation_reason) == ("superseded", "user_requested")
        assert job.cancellation_message.removeprefix("superseded by job ") in job_ids
    unfinished = [j.id for j in _jobs_with(key) if j.status not in TERMINAL]
    assert unfinished == [newest]
    wait_status(newest, "running")
    service.cancel_job(newest)
    wait_terminal(newest)


def test_the_cli_supersedes_by_key(worker, api_server):
    key = _key()
    first = submit(400, stage_delay_s=0.03, supersede_key=key)
    done = subprocess.run([ANDON, "submit", "--supersede-key", key, "a document"], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "ANDON_API_URL": api_server})
    assert done.returncode == 0, done.stderr
    assert_superseded(first, by=done.stdout.strip())


def test_a_bad_supersede_key_is_a_422_naming_it(api_client):
    for bad in ("", "a b", "x" * 129, "ключ", 7):
        answer = api_client.post("/api/jobs", json={"documents": ["a"], "supersede_key": bad})
        assert answer.status_code == 422, bad
        assert answer.json()["detail"][0]["loc"][-1] == "supersede_key"
    try:
        service.submit_job(["a"], supersede_key="a b")
    except Exception as exc:
        assert "supersede_key" in str(exc)
    else:
        raise AssertionError("a bad key was accepted")


def test_claims_on_one_key_are_serialized_on_either_database(db_url):
    """The rows alone, on SQLite and PostgreSQL: racing claims on one key each see every job committed
    before them, so exactly one job — the last claim's — is superseded by none."""
    from db import jobs as job_rows
    from db import supersede

    key, racers, seen = _key(), 8, {}
    start = threading.Barrier(racers)

    def claim() -> None:
        job_id = str(uuid.uuid4())
        start.wait()
        with session_scope(db_url) as session:
            seen[job_id] = supersede.claim(session, "acme", key, job_id)
            job_rows.create_job(session, job_id, ["a"], {}, tenant="acme", supersede_key=key)

    threads = [threading.Thread(target=claim) for _ in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(seen) == racers
    superseded = {old for olds in seen.values() for old in olds}
    (newest,) = set(seen) - superseded
    assert sorted(len(olds) for olds in seen.values()) == list(range(racers))  # a total order
    assert set(seen[newest]) == set(seen) - {newest}
    with session_scope(db_url) as session:
        assert session.get(SupersedeKey, ("acme", key)).job_id == newest
