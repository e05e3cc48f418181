"""The Host-header allowlist (DNS rebinding can't reach a local stack) and /readyz (503 naming the
dependency that doesn't answer, within a bounded time), against the in-process API and real uvicorn."""

from __future__ import annotations

import socket
import time
from contextlib import contextmanager

import httpx
import pytest

from api.hosts import host_allowed
from api.supervisor import free_port
from db.models import Job
from db.session import session_scope
from db.settings import Settings, get_settings

REBOUND = {"Host": "rebind.attacker.example"}


@pytest.fixture
def setting(monkeypatch):
    """Set ANDON_* variables for one test; the settings are re-read now and after it."""

    def put(**values: str | None) -> None:
        for name, value in values.items():
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        get_settings.cache_clear()

    yield put
    monkeypatch.undo()
    get_settings.cache_clear()


def test_a_request_for_another_host_is_refused_before_anything_runs(api_client):
    before = _jobs()
    answer = api_client.post("/api/jobs", json={"documents": ["a"]}, headers=REBOUND)
    assert answer.status_code == 400
    assert "rebind.attacker.example" in answer.json()["detail"] and "ANDON_ALLOWED_HOSTS" in answer.json()["detail"]
    assert _jobs() == before
    for path in ("/api/jobs", "/api/pipelines", "/metrics", "/readyz", "/docs"):
        assert api_client.get(path, headers=REBOUND).status_code == 400, path
    assert api_client.get("/healthz", headers=REBOUND).json() == {"status": "ok"}  # liveness is exempt
    assert api_client.get("/api/jobs").status_code == 200  # `testserver` is allowed in this session


def test_the_default_allowlist_is_the_loopback_names(api_client, setting):
    setting(ANDON_ALLOWED_HOSTS=None)
    assert Settings().allowed_host_list == ["localhost", "127.0.0.1", "::1"]
    assert api_client.get("/api/jobs").status_code == 400  # TestClient's `testserver` is no longer listed
    for host in ("localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST"):
        assert api_client.get("/api/jobs", headers={"Host": host}).status_code == 200, host
    setting(ANDON_ALLOWED_HOSTS="andon.internal:8443, api")
    assert api_client.get("/api/jobs", headers={"Host": "api:8000"}).status_code == 200
    assert api_client.get("/api/jobs", headers={"Host": "andon.internal:8443"}).status_code == 200
    assert api_client.get("/api/jobs", headers={"Host": "andon.internal:80"}).status_code == 400
    assert api_client.get("/api/jobs", headers={"Host": "localhost"}).status_code == 400


def test_host_matching_rules():
    allowed = ["localhost", "127.0.0.1", "::1", "svc:8000", "*.corp.example"]
    assert host_allowed("localhost:1234", allowed) and host_allowed("[::1]", allowed)
    assert host_allowed("svc:8000", allowed) and not host_allowed("svc:8001", allowed) and not host_allowed("svc", allowed)
    assert host_allowed("a.corp.example", allowed) and not host_allowed("corp.example", allowed)
    assert not host_allowed("evilcorp.example", allowed)
    assert not host_allowed("", allowed) and not host_allowed(":80", allowed)
    assert not host_allowed("127.0.0.1.attacker.example", allowed)
    # the address the request arrived on is always accepted (an IP literal can't be rebound) ...
    assert host_allowed("10.1.2.3:8000", allowed, server_host="10.1.2.3")
    assert not host_allowed("10.1.2.4:8000", allowed, server_host="10.1.2.3")
    # ... but a name never is, whatever it resolves to
    assert not host_allowed("testserver", allowed, server_host="testserver")
    assert host_allowed("anything", ["*"])


def test_uvicorn_refuses_a_rebound_name_and_answers_its_own_address(api_server):
    port = api_server.rsplit(":", 1)[1]
    assert httpx.get(f"{api_server}/api/jobs", timeout=10).status_code == 200
    assert httpx.get(f"{api_server}/api/jobs", headers={"Host": f"localhost:{port}"}, timeout=10).status_code == 200
    refused = httpx.get(f"{api_server}/api/jobs", headers={"Host": f"rebind.attacker.example:{port}"}, timeout=10)
    assert refused.status_code == 400 and "ANDON_ALLOWED_HOSTS" in refused.json()["detail"]
    assert httpx.get(f"{api_server}/healthz", headers=REBOUND, timeout=10).status_code == 200


# --- readiness ------------------------------------------------------------------------------------------

def test_readyz_is_ready_when_the_database_and_redis_answer(api_client):
    answer = api_client.get("/readyz")
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "ready" and set(answer.json()["checks"].values()) == {"ok"}
    assert {"database", "redis"} <= set(answer.json()["checks"])


def test_readyz_names_redis_when_it_is_unreachable(api_client, setting):
    setting(ANDON_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    answer = api_client.get("/readyz")
    assert answer.status_code == 503
    body = answer.json()
    assert body["checks"]["redis"].startswith("unreachable") and body["checks"]["database"] == "ok"
    assert body["detail"].startswith("not ready: redis unreachable")
    assert api_client.get("/healthz").status_code == 200  # liveness doesn't care


def test_readyz_names_the_database_when_it_is_unreachable(api_client, setting):
    setting(ANDON_DATABASE_URL=f"postgresql+psycopg://andon:x@127.0.0.1:{free_port()}/andon")
    answer = api_client.get("/readyz")
    assert answer.status_code == 503
    assert answer.json()["checks"]["database"].startswith("unreachable") and answer.json()["checks"]["redis"] == "ok"
    assert "database unreachable" in answer.json()["detail"]


def test_readyz_answers_in_bounded_time_when_dependencies_hang(api_client, setting):
    """A server that accepts the connection and never says a word: the check gives up on time."""
    with _silent_server() as port:
        setting(ANDON_READY_TIMEOUT_S="0.5", ANDON_REDIS_URL=f"redis://127.0.0.1:{port}/0",
                ANDON_DATABASE_URL=f"postgresql+psycopg://andon:x@127.0.0.1:{port}/andon")
        for _ in range(3):  # asked again while the first database probe still hangs: no pile-up
            started = time.monotonic()
            answer = api_client.get("/readyz")
            assert time.monotonic() - started < 3
            assert answer.status_code == 503
            checks = answer.json()["checks"]
            assert checks["database"].startswith("unreachable") and checks["redis"].startswith("unreachable")


@contextmanager
def _silent_server():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)  # connections complete in the backlog; nothing is ever accepted or answered
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()  # the hung probe's connection is reset: its thread ends


def _jobs() -> int:
    with session_scope() as session:
        return session.query(Job).count()


def test_andon_api_bound_to_a_name_answers_that_name(database, tmp_path):
    """`andon api --host NAME` adds NAME to the default allowlist (an address needs no listing)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from api.supervisor import stop_process
    from tests.procs import wait_for

    name = socket.gethostname()
    try:
        address = socket.gethostbyname(name)
    except OSError:
        pytest.skip(f"this machine's name {name!r} doesn't resolve")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "ANDON_ALLOWED_HOSTS"}
    with (tmp_path / "api.log").open("wb") as log:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "andon"), "api", "--host", name, "--port", str(port)],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://{address}:{port}"
    try:
        wait_for(lambda: _answers(f"{base}/healthz"), 30, what="andon api to listen")
        assert httpx.get(f"{base}/api/jobs", headers={"Host": f"{name}:{port}"}, timeout=10).status_code == 200
        assert httpx.get(f"{base}/api/jobs", headers={"Host": f"not-{name}:{port}"}, timeout=10).status_code == 400
    finally:
        stop_process(proc, timeout=10)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
