"""Text the database can't store — a NUL character, a lone surrogate (or a NaN) — is a 422 naming the field,
before anything is written, on SQLite and PostgreSQL alike (PostgreSQL refuses NUL in text and
``\\u0000`` in jsonb; neither driver encodes a lone surrogate)."""

from __future__ import annotations

import json
import uuid

import pytest
from sqlalchemy import func, select

from db import jobs as job_rows
from db.models import Job, JobEvent
from db.session import session_scope
from db.settings import get_settings

NUL, SURROGATE = "\u0000", "\ud800"


@pytest.fixture
def api_on(db_url, api_client, monkeypatch):
    """The in-process API on a fresh database of each kind."""
    monkeypatch.setenv("ANDON_DATABASE_URL", db_url)
    get_settings.cache_clear()
    yield api_client, db_url
    monkeypatch.undo()
    get_settings.cache_clear()


def _post(client, path: str, body: dict):
    """Send the JSON as written (``\\u0000`` and ``\\ud800`` escapes stay escapes on the wire)."""
    return client.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})


def _counts(url: str) -> tuple[int, int]:
    with session_scope(url) as session:
        return (session.scalar(select(func.count()).select_from(Job)),
                session.scalar(select(func.count()).select_from(JobEvent)))


SUBMITS = [
    ({"documents": ["fine", f"bad{NUL}text"]}, ["body", "documents", 1]),
    ({"documents": [f"lone {SURROGATE}"]}, ["body", "documents", 0]),
    ({"pipeline": "user-sync", "items": ["a", {"nested": [1, {"deep": f"x{NUL}"}]}]},
     ["body", "items", 1, "nested", 1, "deep"]),
    ({"pipeline": "user-sync", "items": [{f"key{NUL}": 1}]}, ["body", "items", 0, f"key{NUL}"]),
    ({"documents": ["a"], "options": {"analyzer": f"local{NUL}"}}, ["body", "options", "analyzer"]),
    ({"documents": ["a"], "options": {f"opt{NUL}": 1}}, ["body", "options", f"opt{NUL}"]),
    ({"documents": ["a"], "tags": [f"tag{NUL}"]}, ["body", "tags", 0]),
    ({"pipeline": "user-sync", "items": [{"score": float("nan")}]}, ["body", "items", 0, "score"]),
    ({"documents": ["a"], "options": {"stage_delay_s": float("inf")}}, ["body", "options", "stage_delay_s"]),
    ({"documents": ["a"], f"surprise{SURROGATE}": 1}, ["body"]),  # even the 422's echo can't break
]


@pytest.mark.parametrize(("body", "loc"), SUBMITS)
def test_a_submit_with_text_the_database_cant_store_is_422_naming_the_field(api_on, body, loc):
    client, url = api_on
    answer = _post(client, "/api/jobs", body)
    assert answer.status_code == 422, answer.text
    assert any(error["loc"] == loc for error in answer.json()["detail"]), answer.json()
    assert _counts(url) == (0, 0)  # nothing written


def test_a_cancel_message_the_database_cant_store_is_422_and_changes_nothing(api_on):
    client, url = api_on
    job_id = str(uuid.uuid4())
    with session_scope(url) as session:  # a queued job (never enqueued: nothing would run it here)
        job_rows.create_job(session, job_id, ["a"], {}, pipeline="documents", tags=["nul-test"])
    before = _counts(url)
    for message in (f"stop{NUL}now", f"stop {SURROGATE}"):
        answer = _post(client, f"/api/jobs/{job_id}/cancel", {"message": message})
        assert answer.status_code == 422, answer.text
        assert answer.json()["detail"][0]["loc"] == ["body", "message"]
        bulk = _post(client, "/api/jobs/cancel", {"tag": "nul-test", "message": message})
        assert bulk.status_code == 422 and bulk.json()["detail"][0]["loc"] == ["body", "message"]
    bulk = _post(client, "/api/jobs/cancel", {"parent_job_id": f"x{NUL}"})
    assert bulk.status_code == 422 and bulk.json()["detail"][0]["loc"] == ["body", "parent_job_id"]
    assert _counts(url) == before
    with session_scope(url) as session:
        assert session.get(Job, job_id).status == "pending"


@pytest.mark.parametrize("suffix", ["", "/partial-results", "/events"])
def test_a_job_id_with_a_nul_is_simply_not_found(api_on, suffix):
    client, _ = api_on
    answer = client.get(f"/api/jobs/bad%00id{suffix}")
    assert answer.status_code == 404 and answer.json() == {"detail": "job bad\x00id not found"}
    for action in ("cancel", "resume"):
        assert client.post(f"/api/jobs/bad%00id/{action}").status_code == 404
    child = _post(client, "/api/jobs", {"documents": ["a"], "parent_job_id": f"p{NUL}"})
    assert child.status_code == 422


@pytest.mark.parametrize("text, why", [
    ("plain ascii", None),
    ("ascii with a " + NUL + " in it", "NUL"),
    ("café ✓ 日本", None),
    ("café with a " + NUL, "NUL"),  # not ASCII: the regex's path finds the NUL too
    ("café with a " + SURROGATE, "surrogate"),
    ("\U0001f600 a pair written as one character", None),
])
def test_unstorable_text_is_found_whether_or_not_the_text_is_ascii(text, why):
    """ASCII text takes a NUL search alone (it can hold no surrogate), other text the regex: both
    name the same problems, as plain values, as keys and deep in a body."""
    from tasks.errors import InvalidInput
    from tasks.intake import check_storable, unstorable

    found = unstorable(text)
    assert (found is None) if why is None else (why in found)
    for body, loc in (([{"a": [text]}], ["items", 0, "a", 0]), ({text: 1}, ["items", text])):
        if why is None:
            check_storable(body, ["items"])
        else:
            with pytest.raises(InvalidInput) as raised:
                check_storable(body, ["items"])
            assert raised.value.errors[0]["loc"] == loc
            assert why in raised.value.errors[0]["msg"]
