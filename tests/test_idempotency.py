"""Idempotent submits: a retry with the same Idempotency-Key replays the first answer (same status,
body and job), another request with the key is a 409, and a concurrent retry waits for the first."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from api import idempotency
from db.models import IdempotencyKey, JobTag, utcnow
from db.session import session_scope
from tasks.errors import IdempotencyConflict
from tests.jobs_helpers import docs, wait_terminal

ANDON = str(Path(sys.executable).parent / "andon")


def _key() -> str:
    return f"retry-{uuid.uuid4()}"


def _tagged(tag: str) -> int:
    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(JobTag).where(JobTag.tag == tag))


def test_a_retry_replays_the_first_answer_and_makes_no_second_job(api_client):
    key, tag = _key(), f"idem-{uuid.uuid4().hex[:8]}"
    body = {"documents": docs(2), "tags": [tag]}
    first = api_client.post("/api/jobs", json=body, headers={"Idempotency-Key": key})
    again = api_client.post("/api/jobs", json=body, headers={"Idempotency-Key": key})
    assert first.status_code == again.status_code == 202
    assert first.json() == again.json() and first.json()["status"] == "pending"
    assert (first.headers["Idempotent-Replayed"], again.headers["Idempotent-Replayed"]) == ("false", "true")
    # the same request spelled otherwise (defaults written out) is the same request
    spelled = api_client.post("/api/jobs", json={**body, "pipeline": "documents", "options": {}},
                              headers={"Idempotency-Key": key})
    assert spelled.json() == first.json()
    wait_terminal(first.json()["job_id"])
    assert _tagged(tag) == 1
    # without the key, the same body is a new job
    assert api_client.post("/api/jobs", json=body).json()["job_id"] != first.json()["job_id"]


def test_the_same_key_with_another_body_or_route_is_a_409(api_client):
    key = _key()
    assert api_client.post("/api/jobs", json={"documents": ["a"]}, headers={"Idempotency-Key": key}).status_code == 202
    other = api_client.post("/api/jobs", json={"documents": ["b"]}, headers={"Idempotency-Key": key})
    assert other.status_code == 409 and "different request" in other.json()["detail"]
    chain = api_client.post("/api/chains", json={"jobs": [{"documents": ["a"]}]}, headers={"Idempotency-Key": key})
    assert chain.status_code == 409


def test_keys_belong_to_their_tenant(worker):
    key, body = _key(), {"documents": ["a"]}

    def submit(tenant: str) -> str:
        from api import service
        from api.schemas import SubmitRequest

        request = SubmitRequest.model_validate(body)
        run = lambda: service.submit_job(request.documents, tenant=tenant)  # noqa: E731
        return idempotency.run_once(tenant, key, "POST /api/jobs", request, 202, run)[1]["job_id"]

    assert submit("acme") == submit("acme") != submit("globex")


def test_an_error_is_not_replayed_and_frees_the_key(api_client):
    key = _key()
    unknown = api_client.post("/api/jobs", json={"pipeline": "nope", "items": [1]}, headers={"Idempotency-Key": key})
    assert unknown.status_code == 422
    assert api_client.post("/api/jobs", json={"pipeline": "nope", "items": [1]},
                           headers={"Idempotency-Key": key}).status_code == 422
    fixed = api_client.post("/api/jobs", json={"documents": ["a"]}, headers={"Idempotency-Key": key})
    assert fixed.status_code == 202


def test_a_key_is_forgotten_after_24_hours(api_client):
    key = _key()
    first = api_client.post("/api/jobs", json={"documents": ["a"]}, headers={"Idempotency-Key": key}).json()
    with session_scope() as session:
        session.get(IdempotencyKey, ("", key)).created_at = utcnow() - timedelta(hours=24, seconds=1)
    later = api_client.post("/api/jobs", json={"documents": ["a"]}, headers={"Idempotency-Key": key}).json()
    assert later["job_id"] != first["job_id"]


def test_a_concurrent_retry_waits_for_the_first_answer(worker):
    key, calls, answers = _key(), [], []

    def slow() -> dict:
        calls.append(1)
        time.sleep(0.5)
        return {"job_id": f"job-{len(calls)}"}

    def request() -> None:
        answers.append(idempotency.run_once(None, key, "POST /api/jobs", {"documents": ["a"]}, 202, slow))

    threads = [threading.Thread(target=request) for _ in range(3)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert sorted(replayed for _, _, replayed in answers) == [False, True, True]
    assert {answer["job_id"] for _, answer, _ in answers} == {"job-1"}


def test_a_retry_gives_up_waiting_with_a_409(worker, monkeypatch):
    monkeypatch.setattr(idempotency, "WAIT_S", 0.2)
    key, release = _key(), threading.Event()
    first = threading.Thread(target=idempotency.run_once,
                             args=(None, key, "r", {"a": 1}, 202, lambda: release.wait(5) and {"ok": 1}))
    first.start()
    time.sleep(0.1)
    with pytest.raises(IdempotencyConflict, match="still running"):
        idempotency.run_once(None, key, "r", {"a": 1}, 202, lambda: {"ok": 2})
    release.set()
    first.join()
    assert idempotency.run_once(None, key, "r", {"a": 1}, 202, lambda: {"ok": 3})[1:] == ({"ok": 1}, True)


def test_racing_requests_with_one_key_make_one_job(api_server):
    key, tag, racers = _key(), f"race-{uuid.uuid4().hex[:8]}", 6
    start, answers = threading.Barrier(racers), []

    def race() -> None:
        with httpx.Client(base_url=api_server, timeout=60) as client:
            start.wait()
            answers.append(client.post("/api/jobs", json={"documents": ["a"], "tags": [tag]},
                                       headers={"Idempotency-Key": key}))

    threads = [threading.Thread(target=race) for _ in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [a.status_code for a in answers] == [202] * racers, [a.text for a in answers]
    assert len({a.text for a in answers}) == 1
    assert _tagged(tag) == 1


def test_chains_and_chords_replay_too(api_client):
    key = _key()
    chain = {"jobs": [{"documents": ["a"]}, {"documents": ["b"]}]}
    first = api_client.post("/api/chains", json=chain, headers={"Idempotency-Key": key})
    again = api_client.post("/api/chains", json=chain, headers={"Idempotency-Key": key})
    assert first.status_code == again.status_code == 202 and first.json() == again.json()
    key = _key()
    chord = {"header": [{"documents": ["a"]}], "body": {"documents": ["b"]}}
    first = api_client.post("/api/chords", json=chord, headers={"Idempotency-Key": key})
    again = api_client.post("/api/chords", json=chord, headers={"Idempotency-Key": key})
    assert first.status_code == again.status_code == 202 and first.json() == again.json()
    assert wait_terminal(first.json()["body_job_id"]).status == "completed"


@pytest.mark.parametrize("bad", ["", "has space", "x" * 129, "ключ", "a\tb"])
def test_a_bad_key_is_a_422_naming_the_header(api_client, bad):
    answer = api_client.post("/api/jobs", json={"documents": ["a"]}, headers={"Idempotency-Key": bad.encode()})
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]


def test_the_cli_replays_with_its_idempotency_key(worker):
    key = _key()
    run = [ANDON, "submit", "--idempotency-key", key, "a document"]
    first, again = (subprocess.run(run, capture_output=True, text=True, timeout=60) for _ in range(2))
    assert first.returncode == again.returncode == 0, first.stderr + again.stderr
    assert first.stdout == again.stdout and first.stdout.strip()
    other = subprocess.run([*run[:-1], "another document"], capture_output=True, text=True, timeout=60)
    assert other.returncode == 1 and other.stderr.startswith("andon: ") and "different request" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1
    bad = subprocess.run([ANDON, "submit", "--idempotency-key", "a b", "x"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 1 and "Idempotency-Key" in bad.stderr  # the server says what is wrong with it
