"""The HTTP API's routes and shapes, as DESIGN.md states them, against the real worker."""

from __future__ import annotations

import pytest

from tests.jobs_helpers import docs, wait_items, wait_terminal

JOB_KEYS = {"job_id", "status", "cancelled", "cancellation_reason", "cancellation_message", "total_items",
            "completed_items", "created_at", "started_at", "finished_at"}
PARTIAL_KEYS = {"job_id", "status", "completion_percent", "total_items", "completed_items", "results",
                "failed_items", "cancelled_at_item"}


def _submit(client, n=3, delay=0.0, **extra):
    answer = client.post("/api/jobs", json={"documents": docs(n), "options": {"stage_delay_s": delay}, **extra})
    assert answer.status_code == 202, answer.text
    assert answer.json()["status"] == "pending"
    return answer.json()["job_id"]


def test_submit_get_list_and_partial_results_shapes(api_client):
    job_id = _submit(api_client)
    wait_terminal(job_id)
    job = api_client.get(f"/api/jobs/{job_id}").json()
    assert JOB_KEYS <= set(job) and job["status"] == "completed" and job["cancelled"] is False
    listed = api_client.get("/api/jobs", params={"status": "completed", "limit": 500}).json()
    assert job_id in [j["job_id"] for j in listed] and all(j["status"] == "completed" for j in listed)
    partial = api_client.get(f"/api/jobs/{job_id}/partial-results").json()
    assert PARTIAL_KEYS <= set(partial)
    assert partial["status"] == "complete" and partial["completion_percent"] == 100.0
    assert [r["index"] for r in partial["results"]] == [0, 1, 2]


def test_cancel_a_running_job_over_http(api_client):
    job_id = _submit(api_client, n=30, delay=0.03)
    wait_items(job_id, 3)
    answer = api_client.post(f"/api/jobs/{job_id}/cancel", json={"reason": "user_requested", "message": "stop"})
    assert answer.status_code == 202
    assert answer.json() == {"job_id": job_id, "status": "cancelling", "message": "Cancellation requested"}
    wait_terminal(job_id)
    job = api_client.get(f"/api/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and job["cancelled"] is True
    assert job["cancellation_reason"] == "user_requested" and job["cancellation_message"] == "stop"
    partial = api_client.get(f"/api/jobs/{job_id}/partial-results").json()
    assert partial["status"] == "partial" and 3 <= partial["completed_items"] < 30
    assert partial["cancelled_at_item"] == partial["completed_items"]


def test_cancel_with_no_body_defaults_to_user_requested(api_client):
    job_id = _submit(api_client, n=50, delay=0.05)
    answer = api_client.post(f"/api/jobs/{job_id}/cancel")
    assert answer.status_code == 202 and answer.json()["status"] in ("cancelled", "cancelling")
    assert wait_terminal(job_id).cancellation_reason == "user_requested"


def test_cancel_errors_are_clear_and_change_nothing(api_client):
    job_id = _submit(api_client, n=1)
    wait_terminal(job_id)
    done = api_client.post(f"/api/jobs/{job_id}/cancel")
    assert done.status_code == 400 and "already completed" in done.json()["detail"]
    assert api_client.get(f"/api/jobs/{job_id}").json()["status"] == "completed"

    missing = api_client.post("/api/jobs/no-such-job/cancel")
    assert missing.status_code == 404 and "not found" in missing.json()["detail"]

    running = _submit(api_client, n=50, delay=0.05)
    bad = api_client.post(f"/api/jobs/{running}/cancel", json={"reason": "bored"})
    assert bad.status_code == 422 and "user_requested" in bad.text
    assert api_client.get(f"/api/jobs/{running}").json()["status"] in ("pending", "running")
    api_client.post(f"/api/jobs/{running}/cancel")
    wait_terminal(running)


@pytest.mark.parametrize("path", ["/api/jobs/nope", "/api/jobs/nope/partial-results"])
def test_unknown_job_is_404(api_client, path):
    answer = api_client.get(path)
    assert answer.status_code == 404 and answer.json() == {"detail": "job nope not found"}


@pytest.mark.parametrize(
    "body",
    [{}, {"documents": []}, {"documents": "text"}, {"documents": ["a"], "options": {"stage_delay_s": -1}},
     {"documents": ["a"], "deadline_s": 0}, {"documents": ["a"], "surprise": 1},
     {"documents": ["a"], "options": {"analyzer": "magic"}}],
)
def test_malformed_submit_is_422(api_client, body):
    assert api_client.post("/api/jobs", json=body).status_code == 422


def test_health_and_metrics(api_client):
    assert api_client.get("/healthz").json() == {"status": "ok"}
    job_id = _submit(api_client, n=30, delay=0.03)
    wait_items(job_id, 2)
    api_client.post(f"/api/jobs/{job_id}/cancel")
    wait_terminal(job_id)
    text = api_client.get("/metrics").text
    assert 'andon_jobs{reason="user_requested",status="cancelled"}' in text
    assert "andon_cancel_request_to_observe_seconds_bucket" in text
    assert "andon_cancel_observe_to_terminal_seconds_count" in text
    latency = api_client.get(f"/api/jobs/{job_id}").json()["cancel_latency"]
    assert 0 <= latency["request_to_observe_ms"] < 5000 and latency["observe_to_stop_ms"] >= 0


def test_every_api_route_needs_the_bearer_token_when_one_is_set(api_client, monkeypatch):
    from db.settings import get_settings

    monkeypatch.setenv("ANDON_API_TOKEN", "s3cret")
    get_settings.cache_clear()
    try:
        assert api_client.post("/api/jobs", json={"documents": ["a"]}).status_code == 401
        assert api_client.post("/api/jobs/x/cancel", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = api_client.post("/api/jobs", json={"documents": ["a"]}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 202
        job_id = ok.json()["job_id"]
        for path in ("/api/jobs", f"/api/jobs/{job_id}", f"/api/jobs/{job_id}/partial-results",
                     f"/api/jobs/{job_id}/events", "/api/pipelines"):  # reads need it too
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                answer = api_client.get(path, headers=headers)
                assert answer.status_code == 401, path
                assert answer.json() == {"detail": "missing or invalid bearer token"}
        assert api_client.get(f"/api/jobs/{job_id}", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert api_client.get("/healthz").status_code == 200 and api_client.get("/metrics").status_code == 200
        wait_terminal(job_id)
    finally:
        monkeypatch.delenv("ANDON_API_TOKEN")
        get_settings.cache_clear()


def test_public_reads_open_the_reads_on_purpose_and_only_them(api_client, monkeypatch):
    from db.settings import get_settings

    monkeypatch.setenv("ANDON_API_TOKEN", "s3cret")
    monkeypatch.setenv("ANDON_PUBLIC_READS", "1")
    get_settings.cache_clear()
    try:
        job_id = api_client.post("/api/jobs", json={"documents": ["a"]},
                                 headers={"Authorization": "Bearer s3cret"}).json()["job_id"]
        assert api_client.get(f"/api/jobs/{job_id}").status_code == 200
        assert api_client.get("/api/jobs").status_code == 200
        assert api_client.get(f"/api/jobs/{job_id}/partial-results").status_code == 200
        assert api_client.get("/api/pipelines").status_code == 200
        assert api_client.post("/api/jobs", json={"documents": ["a"]}).status_code == 401  # writes don't open
        assert api_client.post(f"/api/jobs/{job_id}/cancel").status_code == 401
        wait_terminal(job_id)
    finally:
        monkeypatch.delenv("ANDON_API_TOKEN")
        monkeypatch.delenv("ANDON_PUBLIC_READS")
        get_settings.cache_clear()

