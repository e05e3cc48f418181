"""The `andon` CLI as a user runs it: a real subprocess against the session's stack."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.jobs_helpers import wait_items, wait_terminal

ANDON = str(Path(sys.executable).parent / "andon")


def andon(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([ANDON, *args], capture_output=True, text=True, input=stdin, timeout=60)


def test_submit_show_ls_results_cancel_round_trip(worker):
    submitted = andon("submit", "--json", "--stage-delay", "0.03", *[f"Doc {i}. Some text here." for i in range(30)])
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["job_id"]
    wait_items(job_id, 3)

    cancelled = andon("cancel", job_id, "--reason", "timeout", "--message", "from the cli")
    assert cancelled.returncode == 0, cancelled.stderr
    assert f"{job_id}: cancelling" in cancelled.stdout
    wait_terminal(job_id)

    shown = json.loads(andon("show", job_id, "--json").stdout)
    assert (shown["status"], shown["cancellation_reason"], shown["cancellation_source"]) == (
        "cancelled", "timeout", "cli")
    assert shown["resumable"] is True
    listed = json.loads(andon("ls", "--status", "cancelled", "--json", "--limit", "1000").stdout)
    assert job_id in [j["job_id"] for j in listed]
    results = json.loads(andon("results", job_id, "--json").stdout)
    assert results["status"] == "partial" and results["completed_items"] >= 3

    human = andon("show", job_id)
    assert human.returncode == 0 and "cancelled" in human.stdout and "timeout" in human.stdout
    table = andon("results", job_id)
    assert table.returncode == 0 and "Partial results: partial" in table.stdout


def test_submit_from_stdin(worker):
    done = andon("submit", "--file", "-", stdin="First document. Yes.\n\nSecond one here.\n")
    assert done.returncode == 0, done.stderr
    job = wait_terminal(done.stdout.strip())
    assert job.total_items == 2 and job.status == "completed"


def test_cancel_all_in_a_status(worker):
    ids = [json.loads(andon("submit", "--json", "--stage-delay", "0.05",
                            *[f"D{i}." for i in range(100)]).stdout)["job_id"] for _ in range(3)]
    # two pool processes: two jobs run, the third waits; cancel the waiting one first so it can't slip in
    pending = andon("cancel", "--status", "pending", "--all")
    cancelled = andon("cancel", "--status", "running", "--all")
    assert cancelled.returncode == 0 and pending.returncode == 0, cancelled.stderr + pending.stderr
    for job_id in ids:
        assert wait_terminal(job_id).status == "cancelled"


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["show", "nope"], 1, "job nope not found"),
        (["results", "nope"], 1, "job nope not found"),
        (["cancel", "nope"], 1, "job nope not found"),
        (["cancel", "x", "--reason", "bored"], 2, "unknown reason 'bored'"),
        (["ls", "--status", "sleeping"], 2, "unknown status 'sleeping'"),
        (["cancel"], 2, "no job to cancel"),
        (["cancel", "--status", "running"], 2, "with --all"),
        (["submit"], 2, "no items"),
        (["submit", "--file", "/no/such/file"], 2, "cannot read /no/such/file"),
        (["frobnicate"], 2, "No such command"),
    ],
)
def test_user_mistakes_print_one_line_and_fail(worker, args, code, needle):
    done = andon(*args)
    assert done.returncode == code
    assert needle in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr


def test_cancelling_a_finished_job_is_an_error(worker):
    job_id = andon("submit", "One. Two.").stdout.strip()
    wait_terminal(job_id)
    done = andon("cancel", job_id)
    assert done.returncode == 1 and "already completed" in done.stderr


def test_unreachable_redis_is_one_line(worker, tmp_path):
    import os

    env = {**os.environ, "ANDON_REDIS_URL": "redis://127.0.0.1:1/0", "ANDON_BROKER_URL": "redis://127.0.0.1:1/0"}
    done = subprocess.run([ANDON, "submit", "x"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "could not enqueue" in done.stderr
    # the row it made is not left pending forever
    from api import service

    newest = service.list_jobs(limit=1)[0]
    assert newest.status.value == "failed" and "could not enqueue" in newest.error
