"""Live progress: Server-Sent Events from the running API, and `andon watch` on top of them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from api import service
from api.watch import parse_sse
from tests.jobs_helpers import job_row, submit, wait_items, wait_status, wait_terminal
from tests.procs import wait_for

ANDON = str(Path(sys.executable).parent / "andon")


def read_stream(url: str, job_id: str, timeout: float = 60) -> list[tuple[str, dict]]:
    with httpx.stream("GET", f"{url}/api/jobs/{job_id}/events", timeout=timeout) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(parse_sse(response.iter_lines()))


def test_events_arrive_in_order_and_the_stream_closes_at_the_end(api_server):
    job_id = submit(8, stage_delay_s=0.02)
    events = read_stream(api_server, job_id)
    kinds = [e for e, _ in events]
    assert kinds[:2] == ["submitted", "started"] and kinds[-2:] == ["completed", "end"]
    item_events = [d for e, d in events if e == "item"]
    assert [d["index"] for d in item_events] == list(range(8))
    assert events[-1][1]["status"] == "completed" and events[-1][1]["completed_items"] == 8


def test_a_cancel_shows_up_as_requested_observed_cancelled(api_server):
    job_id = submit(40, stage_delay_s=0.03)
    wait_items(job_id, 3)
    service.cancel_job(job_id, message="seen live")
    kinds = [e for e, _ in read_stream(api_server, job_id)]
    assert kinds.index("cancel_requested") < kinds.index("cancel_observed") < kinds.index("cancelled")
    end = read_stream(api_server, job_id)[-1][1]
    assert end["status"] == "cancelled" and end["reason"] == "user_requested" and end["message"] == "seen live"


def test_unknown_job_events_is_404(api_server):
    assert httpx.get(f"{api_server}/api/jobs/nope/events").status_code == 404


@pytest.mark.parametrize("columns", ["40", "200"])
def test_watch_ends_with_status_reason_and_partial_results(api_server, columns):
    job_id = submit(30, stage_delay_s=0.03)
    env = {**os.environ, "ANDON_API_URL": api_server, "COLUMNS": columns}
    watcher = subprocess.Popen([ANDON, "watch", job_id], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)
    wait_items(job_id, 3)
    service.cancel_job(job_id)
    out, err = watcher.communicate(timeout=60)
    assert watcher.returncode == 0, err
    lines = [line.strip() for line in out.splitlines()]
    job = job_row(job_id)
    assert "status: cancelled" in lines
    assert "reason: user_requested (api)" in lines
    assert f"partial results: {job.completed_items} of 30 items done, 0 failed" in " ".join(lines)


def test_watch_json_lines(api_server):
    job_id = submit(3)
    done = subprocess.run([ANDON, "watch", job_id, "--json"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "ANDON_API_URL": api_server})
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert events[0]["event"] == "submitted" and events[-1] == {**events[-1], "event": "end", "status": "completed"}


def test_ctrl_c_in_watch_stops_watching_never_the_job(api_server):
    job_id = submit(200, stage_delay_s=0.03)
    wait_status(job_id, "running")
    # as from a terminal: Ctrl-C at its default even when this suite runs in the background (`cmd &`
    # starts with SIGINT ignored, and an ignored SIGINT is inherited through exec)
    as_in_a_terminal = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                        "os.execv(sys.argv[1], sys.argv[1:])")
    watcher = subprocess.Popen([sys.executable, "-c", as_in_a_terminal, ANDON, "watch", job_id],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "ANDON_API_URL": api_server})
    time.sleep(1.5)
    watcher.send_signal(signal.SIGINT)
    out, err = watcher.communicate(timeout=30)
    seen = f"exit {watcher.returncode}; job {job_row(job_id).status}; stdout {out[-500:]!r}; stderr {err[-500:]!r}"
    assert watcher.returncode == 130 and "goes on" in err and "Traceback" not in err, seen
    time.sleep(0.3)
    assert job_row(job_id).status == "running"
    service.cancel_job(job_id)
    wait_terminal(job_id)


def test_watch_rides_out_an_api_restart_and_gives_nothing_twice(worker, tmp_path):
    from api.supervisor import api_service, free_port

    port = free_port()
    api = api_service(port, tmp_path / "api.log").start()
    job_id = submit(40, stage_delay_s=0.05)
    out = tmp_path / "watch.jsonl"
    with out.open("w") as sink:
        watcher = subprocess.Popen([ANDON, "watch", job_id, "--json"], stdout=sink, stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, "ANDON_API_URL": f"http://127.0.0.1:{port}"})
    try:
        wait_for(lambda: out.read_text().strip(), 60, what="the watch to start")
        wait_items(job_id, 3)
        api.stop(timeout=15)  # its open streams end without an `end`: the job runs on
        assert job_row(job_id).status == "running"
        time.sleep(1)
        api = api_service(port, tmp_path / "api-again.log").start()
        _, err = watcher.communicate(timeout=120)
    finally:
        watcher.kill()
        api.stop(timeout=15)
    assert watcher.returncode == 0, err
    events = [json.loads(line) for line in out.read_text().splitlines()]
    assert events[-1]["event"] == "end" and events[-1]["status"] == "completed"
    done = [e["index"] for e in events if e["event"] == "item"]
    assert sorted(done) == list(range(40))  # each item once, across both streams
    assert [e["event"] for e in events].count("submitted") == 1


def test_watch_without_an_api_is_one_line(worker):
    done = subprocess.run([ANDON, "watch", "x"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "ANDON_API_URL": "http://127.0.0.1:1"})
    assert done.returncode == 1 and "cannot reach the API" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
