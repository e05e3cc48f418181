"""`andon up` and `andon demo` as a user runs them: own home, own ports, nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from api.stack import free_port
from tests.procs import wait_for

ANDON = str(Path(sys.executable).parent / "andon")


def _clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANDON_")}
    return {**env, "PYTHONUNBUFFERED": "1"}  # ANDON_HOME defaults to ./.andon under the cwd


def _alive(procs: list[psutil.Process]) -> list[str]:
    return [" ".join(p.cmdline()[:6]) for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.timeout(180)
def test_up_serves_the_contract_and_stops_without_leaving_processes(tmp_path):
    api_port, flower_port, redis_port = free_port(), free_port(), free_port()
    up = subprocess.Popen(
        [ANDON, "up", "--api-port", str(api_port), "--flower-port", str(flower_port), "--redis-port",
         str(redis_port), "--concurrency", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_clean_env(tmp_path), cwd=tmp_path,
    )
    lines = []
    try:
        deadline = time.monotonic() + 90
        while "Press Ctrl-C" not in "".join(lines):
            assert up.poll() is None and time.monotonic() < deadline, "".join(lines)
            lines.append(up.stdout.readline())
        banner = "".join(lines)
        assert f"http://127.0.0.1:{api_port}" in banner and f"http://127.0.0.1:{flower_port}" in banner
        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) >= 5  # redis, worker (+1 pool process), api, flower

        # other commands find this stack through ANDON_HOME alone
        submitted = subprocess.run([ANDON, "submit", "--json", "--stage-delay", "0.05", *["Text. More."] * 30],
                                   capture_output=True, text=True, env=_clean_env(tmp_path), cwd=tmp_path)
        assert submitted.returncode == 0, submitted.stderr
        job_id = json.loads(submitted.stdout)["job_id"]
        with httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=10) as client:
            wait_for(lambda: client.get(f"/api/jobs/{job_id}").json()["completed_items"] >= 3, 30)
            cancel = client.post(f"/api/jobs/{job_id}/cancel", json={"reason": "user_requested"})
            assert cancel.status_code == 202 and cancel.json()["status"] == "cancelling"
            job = wait_for(lambda: (j := client.get(f"/api/jobs/{job_id}").json())["status"] == "cancelled" and j, 30)
            assert job["cancellation_reason"] == "user_requested"
            partial = client.get(f"/api/jobs/{job_id}/partial-results").json()
            assert partial["status"] == "partial" and 3 <= partial["completed_items"] < 30
            assert client.get("/api/jobs/nope").status_code == 404
            assert client.post(f"/api/jobs/{job_id}/cancel").status_code == 400
            assert client.post(f"/api/jobs/{job_id}/cancel", json={"reason": "x"}).status_code == 422
            assert client.get("/docs").status_code == 200
            # a job still running when `andon up` is stopped
            running = client.post("/api/jobs", json={"documents": ["Text. More."] * 200,
                                                     "options": {"stage_delay_s": 0.05}}).json()["job_id"]
            wait_for(lambda: client.get(f"/api/jobs/{running}").json()["completed_items"] >= 2, 30)
        # Flower is up, and only with its basic auth
        auth = json.loads((tmp_path / ".andon" / "stack.json").read_text())["flower_basic_auth"].split(":", 1)
        assert httpx.get(f"http://127.0.0.1:{flower_port}/api/workers", timeout=10).status_code == 401
        assert httpx.get(f"http://127.0.0.1:{flower_port}/api/workers", auth=tuple(auth), timeout=10).status_code == 200
    finally:
        up.send_signal(signal.SIGTERM)
        out, _ = up.communicate(timeout=90)
    assert up.returncode == 0, out
    assert "Stopped." in out
    wait_for(lambda: not _alive(children), 10, what=f"no processes left: {_alive(children)}")
    assert not (tmp_path / ".andon" / "stack.json").exists()
    scratch = tmp_path / ".andon" / "tmp" / "jobs"  # made on a stage's first use of its scratch dir
    assert not scratch.exists() or list(scratch.iterdir()) == []
    # stopping `andon up` is a warm shutdown: the running job stopped at a checkpoint, resumable
    from db.models import Job
    from db.session import session_scope

    with session_scope(f"sqlite:///{tmp_path / '.andon' / 'andon.db'}") as session:
        stopped = session.get(Job, running)
        assert (stopped.status, stopped.cancellation_reason, stopped.cancellation_source) == (
            "cancelled", "system_shutdown", "worker_shutdown")
        assert stopped.resumable and 2 <= stopped.completed_items < 200


def test_up_refuses_a_busy_port_with_one_line(tmp_path, redis_server):
    from tests.conftest import REDIS_PORT

    done = subprocess.run([ANDON, "up", "--redis-port", str(REDIS_PORT), "--api-port", str(free_port())],
                          capture_output=True, text=True, env=_clean_env(tmp_path), cwd=tmp_path, timeout=60)
    assert done.returncode == 1
    assert f"port {REDIS_PORT} is in use" in done.stderr and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.timeout(180)
def test_demo_cancels_a_third_of_the_way_and_shows_partial_results(tmp_path):
    done = subprocess.run([ANDON, "demo", "--json"], capture_output=True, text=True, env=_clean_env(tmp_path),
                          cwd=tmp_path, timeout=170)
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(done.stdout)
    job, partial = outcome["job"], outcome["partial_results"]
    assert job["status"] == "cancelled" and job["cancellation_reason"] == "user_requested"
    assert partial["status"] == "partial" and 9 <= partial["completed_items"] < 30
    assert [f["index"] for f in partial["failed_items"]] == [4]
    resumed, after = outcome["resumed"], outcome["resumed_results"]
    assert resumed["status"] == "completed" and resumed["resumed_from"] == job["job_id"]
    assert after["status"] == "complete" and after["completed_items"] == 29  # all but the blank one
    assert "Started the embedded stack" in done.stderr and "Stopping" not in done.stdout
