"""Auth and tenants: with tenant tokens set, every /api route needs a token and a tenant sees only
its own jobs (404, not 403, so ids don't leak). Broker and backend are JSON-only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from db.settings import get_settings
from tasks.app import app
from tests.jobs_helpers import job_row, wait_terminal
from tests.procs import wait_for

ANDON = str(Path(sys.executable).parent / "andon")
TOKENS = {"acme": "acme-token", "globex": "globex-token"}


@pytest.fixture
def tenants(monkeypatch):
    monkeypatch.setenv("ANDON_API_TOKENS", json.dumps(TOKENS))
    get_settings.cache_clear()
    yield {name: {"Authorization": f"Bearer {token}"} for name, token in TOKENS.items()}
    monkeypatch.delenv("ANDON_API_TOKENS")
    get_settings.cache_clear()


def test_every_api_route_needs_a_tenant_token(api_client, tenants):
    assert api_client.get("/api/jobs").status_code == 401
    assert api_client.get("/api/jobs", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert api_client.post("/api/jobs", json={"documents": ["a"]}).status_code == 401
    assert api_client.get("/api/jobs", headers=tenants["acme"]).status_code == 200
    assert api_client.get("/healthz").status_code == 200  # operations endpoints stay open


def test_a_tenant_can_neither_see_nor_cancel_another_tenants_jobs(api_client, tenants):
    acme, globex = tenants["acme"], tenants["globex"]
    job_id = api_client.post("/api/jobs", json={"documents": ["One. Two."] * 200, "options": {"stage_delay_s": 0.05}},
                             headers=acme).json()["job_id"]
    for method, path in [("get", f"/api/jobs/{job_id}"), ("get", f"/api/jobs/{job_id}/partial-results"),
                         ("get", f"/api/jobs/{job_id}/events"), ("post", f"/api/jobs/{job_id}/cancel"),
                         ("post", f"/api/jobs/{job_id}/resume")]:
        answer = getattr(api_client, method)(path, headers=globex)
        assert answer.status_code == 404 and answer.json() == {"detail": f"job {job_id} not found"}, path
    assert job_id not in [j["job_id"] for j in api_client.get("/api/jobs", headers=globex).json()]
    assert api_client.post("/api/jobs/cancel", json={"status": "running"}, headers=globex).json()["matched"] == 0
    child = api_client.post("/api/jobs", json={"documents": ["a"], "parent_job_id": job_id}, headers=globex)
    assert child.status_code == 422  # a parent the tenant can't see doesn't exist for it
    assert job_row(job_id).status in ("pending", "running")
    # the owner sees and cancels it
    assert job_id in [j["job_id"] for j in api_client.get("/api/jobs", headers=acme).json()]
    assert api_client.post(f"/api/jobs/{job_id}/cancel", headers=acme).status_code == 202
    assert wait_terminal(job_id).tenant == "acme"


def test_the_cli_acts_as_the_tenant_of_its_token(worker, api_client, tenants, home):
    """The CLI speaks HTTP: the API it reaches decides which tenant a token is (and refuses the rest)."""
    from api.supervisor import api_service, free_port

    job_id = api_client.post("/api/jobs", json={"documents": ["a"]}, headers=tenants["acme"]).json()["job_id"]
    wait_terminal(job_id)
    port = free_port()
    api = api_service(port, home / "logs" / "api-tenants.log", env={"ANDON_API_TOKENS": json.dumps(TOKENS)}).start()
    env = {**os.environ, "ANDON_API_URL": f"http://127.0.0.1:{port}"}
    try:
        as_globex = subprocess.run([ANDON, "show", job_id], capture_output=True, text=True, timeout=60,
                                   env={**env, "ANDON_API_TOKEN": "globex-token"})
        assert as_globex.returncode == 1 and "not found" in as_globex.stderr
        as_acme = subprocess.run([ANDON, "show", job_id, "--json"], capture_output=True, text=True, timeout=60,
                                 env={**env, "ANDON_API_TOKEN": "acme-token"})
        assert as_acme.returncode == 0 and json.loads(as_acme.stdout)["job_id"] == job_id
        nobody = subprocess.run([ANDON, "ls"], capture_output=True, text=True, timeout=60,
                                env={**env, "ANDON_API_TOKEN": "stolen"})
        assert nobody.returncode == 1 and "missing or invalid bearer token (HTTP 401)" in nobody.stderr
        assert len(nobody.stderr.strip().splitlines()) == 1
    finally:
        api.stop(timeout=15)


def test_pickle_is_refused_by_the_worker(worker):
    app.send_task("andon.analyze_documents", args=["pickled-job"], serializer="pickle")
    wait_for(lambda: "ContentDisallowed" in worker.logs() or "disallowed" in worker.logs().lower(), 20,
             what="the worker to refuse the pickled message")
    assert app.conf.accept_content == ["json"] and app.conf.result_accept_content == ["json"]


@pytest.fixture
def admin(tenants, monkeypatch):
    monkeypatch.setenv("ANDON_ADMIN_TOKEN", "admin-token")
    get_settings.cache_clear()
    yield {"Authorization": "Bearer admin-token"}
    monkeypatch.delenv("ANDON_ADMIN_TOKEN")
    get_settings.cache_clear()


def test_with_tenants_metrics_need_the_admin_token(api_client, tenants):
    for headers in ({}, tenants["acme"], {"Authorization": "Bearer admin-token"}):  # no admin token set yet
        answer = api_client.get("/metrics", headers=headers)
        assert answer.status_code == 401 and "ANDON_ADMIN_TOKEN" in answer.json()["detail"]
    assert api_client.get("/healthz").status_code == 200


def test_only_the_admin_token_acts_across_tenants(api_client, admin, tenants):
    import uuid

    tag = f"cross-{uuid.uuid4().hex[:8]}"
    body = {"documents": ["One. Two."] * 200, "options": {"stage_delay_s": 0.05}, "tags": [tag]}
    acme_job = api_client.post("/api/jobs", json=body, headers=tenants["acme"]).json()["job_id"]
    globex_job = api_client.post("/api/jobs", json=body, headers=tenants["globex"]).json()["job_id"]

    # a tenant's bulk cancel stays scoped to its own jobs
    answer = api_client.post("/api/jobs/cancel", json={"tag": tag}, headers=tenants["acme"])
    assert answer.status_code == 202 and answer.json()["matched"] == 1
    assert wait_terminal(acme_job).status == "cancelled"
    assert job_row(globex_job).status in ("pending", "running")

    # the admin sees every tenant's jobs, and its bulk cancel reaches across tenants
    assert api_client.get(f"/api/jobs/{globex_job}", headers=admin).status_code == 200
    assert {acme_job, globex_job} <= {j["job_id"] for j in api_client.get("/api/jobs", params={"tag": tag},
                                                                           headers=admin).json()}
    answer = api_client.post("/api/jobs/cancel", json={"tag": tag}, headers=admin)
    assert answer.status_code == 202 and answer.json()["matched"] == 1
    assert wait_terminal(globex_job).status == "cancelled"

    # /metrics counts every tenant's jobs: the admin's alone
    assert api_client.get("/metrics", headers=tenants["globex"]).status_code == 401
    metrics = api_client.get("/metrics", headers=admin)
    assert metrics.status_code == 200 and "andon_jobs" in metrics.text
