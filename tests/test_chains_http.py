"""Chains and chords through their doors: POST /api/chains, POST /api/chords, `andon chain`,
`andon chord` — each step a submit body, with the dependency_failed cascade of tests/test_dependencies."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy import func, select

from api import service
from api.schemas import ChainRequest
from db.models import JobParent, JobTag
from db.session import session_scope
from db.settings import get_settings
from tests.jobs_helpers import docs, job_row, wait_items, wait_terminal

ANDON = str(Path(sys.executable).parent / "andon")


def andon(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([ANDON, *args], capture_output=True, text=True, input=stdin, timeout=60)


def _tag() -> str:
    return f"chain-{uuid.uuid4().hex[:8]}"


def _tagged(tag: str) -> int:
    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(JobTag).where(JobTag.tag == tag))


def assert_dependency_failed(job_id: str):
    job = wait_terminal(job_id)
    assert (job.status, job.cancellation_reason, job.cancellation_source, job.started_at) == (
        "cancelled", "dependency_failed", "parent", None)
    return job


def test_a_chain_runs_its_steps_in_order_each_as_submitted(api_client):
    tag = _tag()
    steps = [
        {"documents": docs(2), "tags": [tag, "step-1"]},
        {"pipeline": "user-sync", "items": ["x", "y"], "options": {"stage_delay_s": 0.01}, "tags": [tag]},
        {"pipeline": "user-tickets", "items": [{"title": "t", "priority": 5}], "deadline_s": 60, "tags": [tag]},
    ]
    answer = api_client.post("/api/chains", json={"jobs": steps})
    assert answer.status_code == 202, answer.text
    job_ids = answer.json()["job_ids"]
    assert len(job_ids) == 3 and answer.json() == {"job_ids": job_ids}
    jobs = [wait_terminal(job_id) for job_id in job_ids]
    assert [j.status for j in jobs] == ["completed"] * 3
    assert [j.pipeline for j in jobs] == ["documents", "user-sync", "user-tickets"]
    assert [j.parent_job_id for j in jobs] == [None, *job_ids[:2]]
    assert jobs[1].options["stage_delay_s"] == 0.01 and jobs[2].deadline_s == 60
    assert jobs[1].started_at >= jobs[0].finished_at and jobs[2].started_at >= jobs[1].finished_at
    shown = api_client.get(f"/api/jobs/{job_ids[0]}").json()
    assert sorted(shown["tags"]) == sorted([tag, "step-1"])
    results = api_client.get(f"/api/jobs/{job_ids[2]}/partial-results").json()["results"]
    assert results == [{"index": 0, "result": {"title": "T", "urgent": True}}]  # steps don't pass results


def test_a_chain_step_that_fails_ends_the_rest_dependency_failed(api_client):
    steps = [{"documents": docs(2)}, {"documents": ["  ", ""]}, {"documents": docs(2)}]
    first, middle, last = api_client.post("/api/chains", json={"jobs": steps}).json()["job_ids"]
    assert wait_terminal(first).status == "completed"
    assert wait_terminal(middle).status == "failed"
    assert_dependency_failed(last)


def test_a_chord_runs_its_body_after_its_header_and_cancels_it_when_a_header_job_is_cancelled(api_client):
    chord = {"header": [{"documents": docs(2)}, {"pipeline": "user-sync", "items": ["a"]}],
             "body": {"documents": docs(1), "tags": ["chord-body"]}}
    answer = api_client.post("/api/chords", json=chord)
    assert answer.status_code == 202, answer.text
    *header, body = answer.json()["job_ids"]
    assert answer.json()["body_job_id"] == body and len(header) == 2
    assert wait_terminal(body).status == "completed"
    assert job_row(body).started_at >= max(wait_terminal(h).finished_at for h in header)
    with session_scope() as session:
        assert set(session.scalars(select(JobParent.parent_id).where(JobParent.job_id == body))) == set(header)

    chord["header"][0] = {"documents": docs(60), "options": {"stage_delay_s": 0.02}}
    slow, quick, body = api_client.post("/api/chords", json=chord).json()["job_ids"]
    wait_items(slow, 2)
    assert api_client.post(f"/api/jobs/{slow}/cancel", json={"message": "enough"}).status_code == 202
    assert wait_terminal(slow).status == "cancelled"
    assert slow in assert_dependency_failed(body).cancellation_message


@pytest.mark.parametrize(("route", "body", "loc"), [
    ("/api/chains", {"jobs": []}, ["body", "jobs"]),
    ("/api/chains", {"jobs": [{"documents": ["a"]}, {"documents": []}]}, ["body", "jobs", 1, "documents"]),
    ("/api/chains", {"jobs": [{"documents": ["a"]}, {"pipeline": "nope", "items": [1]}]},
     ["body", "jobs", 1, "pipeline"]),
    ("/api/chains", {"jobs": [{"pipeline": "user-tickets", "items": [{"title": "t", "priority": 9}]}]},
     ["body", "jobs", 0, "items", 0, "priority"]),
    ("/api/chains", {"jobs": [{"documents": ["a"], "options": {"stage_delay_s": "slow"}}]},
     ["body", "jobs", 0, "options", "stage_delay_s"]),
    ("/api/chains", {"jobs": [{"documents": ["a"], "parent_job_id": "x"}]}, ["body", "jobs", 0, "parent_job_id"]),
    ("/api/chains", {"jobs": [{"documents": ["a"], "supersede_key": "k"}]}, ["body", "jobs", 0, "supersede_key"]),
    ("/api/chains", {"jobs": [{"documents": ["a\u0000"]}]}, ["body", "jobs", 0, "documents", 0]),
    ("/api/chains", {"jobs": [{"documents": ["a"]}], "extra": 1}, ["body", "extra"]),
    ("/api/chords", {"header": [], "body": {"documents": ["a"]}}, ["body", "header"]),
    ("/api/chords", {"header": [{"documents": ["a"]}]}, ["body", "body"]),
    ("/api/chords", {"header": [{"documents": ["a"]}], "body": {"items": ["a"], "tags": ["bad tag"]}},
     ["body", "body", "tags", 0]),
    ("/api/chords", {"header": [{"documents": ["a"]}, {"documents": ["b"], "deadline_s": -1}],
                     "body": {"documents": ["a"]}}, ["body", "header", 1, "deadline_s"]),
])
def test_a_bad_step_is_a_422_naming_it_and_makes_no_job(api_client, route, body, loc):
    tag = _tag()
    for step in body.get("jobs", body.get("header", [])):
        step.setdefault("tags", [tag])
    answer = api_client.post(route, json=body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"][0]["loc"][:len(loc)] == loc, answer.json()
    assert _tagged(tag) == 0


def test_chains_and_chords_belong_to_the_callers_tenant(api_client, monkeypatch):
    monkeypatch.setenv("ANDON_API_TOKENS", json.dumps({"acme": "acme-token", "globex": "globex-token"}))
    get_settings.cache_clear()
    try:
        acme, globex = ({"Authorization": f"Bearer {t}"} for t in ("acme-token", "globex-token"))
        assert api_client.post("/api/chains", json={"jobs": [{"documents": ["a"]}]}).status_code == 401
        job_ids = api_client.post("/api/chains", json={"jobs": [{"documents": ["a"]}] * 2}, headers=acme).json()["job_ids"]
        chord = api_client.post("/api/chords", json={"header": [{"documents": ["a"]}], "body": {"documents": ["b"]}},
                                headers=acme).json()["job_ids"]
        for job_id in job_ids + chord:
            assert wait_terminal(job_id).tenant == "acme"
            assert api_client.get(f"/api/jobs/{job_id}", headers=globex).status_code == 404
            assert api_client.get(f"/api/jobs/{job_id}", headers=acme).status_code == 200
    finally:
        monkeypatch.delenv("ANDON_API_TOKENS")
        get_settings.cache_clear()


def test_the_python_api_takes_the_same_steps(worker):
    request = ChainRequest.model_validate({"jobs": [{"documents": ["a"]}, {"pipeline": "user-sync", "items": [1]}]})
    job_ids = service.submit_chain_request(request, tenant="acme").job_ids
    assert [wait_terminal(j).status for j in job_ids] == ["completed", "completed"]
    header, body = service.submit_chord_steps([service.Step(["a"]), service.Step([1], pipeline="user-sync")],
                                              service.Step(["b"]))
    assert wait_terminal(body).status == "completed"


def test_andon_chain_and_chord(worker, tmp_path, api_server, monkeypatch):
    monkeypatch.setenv("ANDON_API_URL", api_server)  # the CLI speaks HTTP to the API
    done = andon("chain", "--step", '{"documents": ["a", "b"]}', "--step", '{"pipeline": "user-sync", "items": [1]}')
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.split()
    assert wait_terminal(second).parent_job_id == first and job_row(second).status == "completed"

    done = andon("chord", "--header", '{"documents": ["a"]}', "--header", '{"documents": ["b"]}',
                 "--body", '{"documents": ["c"]}', "--json")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["body_job_id"] == answer["job_ids"][-1] and len(answer["job_ids"]) == 3
    assert wait_terminal(answer["body_job_id"]).status == "completed"

    request = tmp_path / "chain.json"
    request.write_text(json.dumps({"jobs": [{"documents": ["a"]}]}))
    done = andon("chain", "--file", str(request))
    assert done.returncode == 0 and wait_terminal(done.stdout.strip()).status == "completed"
    done = andon("chord", "--file", "-", stdin=json.dumps({"header": [{"documents": ["a"]}], "body": {"documents": ["b"]}}))
    assert done.returncode == 0 and len(done.stdout.split()) == 2


@pytest.mark.parametrize(("args", "says"), [
    (["chain"], "--step"),
    (["chain", "--step", "{not json"], "--step 1 is not JSON"),
    (["chain", "--step", '{"documents": ["a"]}', "--step", '{"documents": []}'], "jobs.1.documents"),
    (["chain", "--step", '{"pipeline": "nope", "items": [1]}'], "unknown pipeline 'nope'"),
    (["chord", "--header", '{"documents": ["a"]}'], "--body"),
    (["chord", "--header", '{"documents": ["a"]}', "--body", '{"documents": ["b"], "parent_job_id": "x"}'],
     "parent_job_id: not allowed"),
    (["chain", "--file", "/nonexistent/chain.json"], "cannot read"),
])
def test_cli_mistakes_are_one_line(worker, args, says, api_server, monkeypatch):
    monkeypatch.setenv("ANDON_API_URL", api_server)
    done = andon(*args)
    assert done.returncode != 0 and done.stdout == ""
    assert done.stderr.startswith("andon: ") and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert says in done.stderr, done.stderr
