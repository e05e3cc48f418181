"""Request limits, checked before a body is parsed and before auth: a body above ANDON_MAX_BODY_BYTES
is 413 (with or without Content-Length), a POST to /api that isn't JSON is 415 (a cross-site form or
no-cors fetch can't cancel a job), and both are in the OpenAPI document."""

from __future__ import annotations

import json

import pytest

from db.settings import get_settings
from tests.jobs_helpers import job_row, submit

LIMIT = 1024


@pytest.fixture
def small_limit(monkeypatch):
    monkeypatch.setenv("ANDON_MAX_BODY_BYTES", str(LIMIT))
    get_settings.cache_clear()
    yield LIMIT
    monkeypatch.undo()
    get_settings.cache_clear()


@pytest.fixture
def with_token(monkeypatch):
    monkeypatch.setenv("ANDON_API_TOKEN", "sekrit")
    get_settings.cache_clear()
    yield {"Authorization": "Bearer sekrit"}
    monkeypatch.undo()
    get_settings.cache_clear()


def _big_body(size: int) -> bytes:
    return json.dumps({"documents": ["x" * size]}).encode()


def test_a_body_above_the_limit_is_413_before_parsing_and_before_auth(api_client, small_limit, with_token):
    # no token at all: the size answer comes first, so nobody learns anything by sending megabytes
    answer = api_client.post("/api/jobs", content=_big_body(2 * LIMIT), headers={"content-type": "application/json"})
    assert answer.status_code == 413
    assert "ANDON_MAX_BODY_BYTES" in answer.json()["detail"] and str(LIMIT) in answer.json()["detail"]


def test_a_chunked_body_without_content_length_is_cut_too(api_client, small_limit):
    def chunks():
        for _ in range(8):
            yield b" " * 512  # whitespace: valid JSON padding, if it were ever parsed

    answer = api_client.post("/api/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in {k.lower() for k in answer.request.headers}
    assert answer.status_code == 413
    assert "ANDON_MAX_BODY_BYTES" in answer.json()["detail"]


def test_a_chunked_body_within_the_limit_still_works(api_client, small_limit):
    body = json.dumps({"documents": ["One short document."]}).encode()
    answer = api_client.post("/api/jobs", content=iter([body[:10], body[10:]]),
                             headers={"content-type": "application/json"})
    assert answer.status_code == 202, answer.text


def test_a_body_at_the_default_limit_is_accepted_up_to_16_mib(api_client):
    assert get_settings().max_body_bytes == 16 * 2**20
    answer = api_client.post("/api/jobs", content=b"{" + b" " * 2**20, headers={"content-type": "application/json"})
    assert answer.status_code == 422  # parsed (and found wanting): not refused for its size


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain", "multipart/form-data"])
def test_a_cross_site_form_cannot_cancel_a_job(api_client, content_type):
    job_id = submit(3, stage_delay_s=5)
    answer = api_client.post(f"/api/jobs/{job_id}/cancel", content=b"reason=user_requested",
                             headers={"content-type": content_type, "origin": "https://evil.example"})
    assert answer.status_code == 415
    assert "application/json" in answer.json()["detail"]
    assert job_row(job_id).cancellation_reason is None
    api_client.post(f"/api/jobs/{job_id}/cancel", json={})  # clean up


def test_a_no_cors_fetch_without_a_body_cannot_cancel_a_job(api_client):
    job_id = submit(3, stage_delay_s=5)
    for browser in ({"origin": "https://evil.example"}, {"sec-fetch-site": "cross-site"}):
        answer = api_client.post(f"/api/jobs/{job_id}/cancel", headers=browser)
        assert answer.status_code == 415, answer.text
    assert job_row(job_id).cancellation_reason is None
    assert api_client.post(f"/api/jobs/{job_id}/cancel").status_code == 202  # curl / scripts: no body, no type


def test_json_with_a_charset_is_json(api_client):
    answer = api_client.post("/api/jobs", content=json.dumps({"documents": ["A doc."]}).encode(),
                             headers={"content-type": "application/json; charset=utf-8"})
    assert answer.status_code == 202, answer.text


def test_a_body_without_a_content_type_is_415(api_client):
    answer = api_client.post("/api/jobs", content=json.dumps({"documents": ["A doc."]}).encode())
    assert answer.status_code == 415


def test_the_limits_are_in_the_openapi_document(api_client):
    schema = api_client.get("/openapi.json").json()
    assert "ANDON_MAX_BODY_BYTES" in schema["info"]["description"]
    assert "ANDON_MAX_STREAMS" in schema["info"]["description"]
    submit_answers = schema["paths"]["/api/jobs"]["post"]["responses"]
    assert {"413", "415"} <= set(submit_answers)
    assert "429" in schema["paths"]["/api/jobs/{job_id}/events"]["get"]["responses"]
