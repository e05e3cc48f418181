"""The `andon` CLI as a user runs it: a real subprocess whose job verbs speak HTTP to the session's real
uvicorn API (ANDON_API_URL), like any operator's laptop would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.jobs_helpers import wait_items, wait_terminal

ANDON = str(Path(sys.executable).parent / "andon")


def andon(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([ANDON, *args], capture_output=True, text=True, input=stdin, timeout=60,
                          env={**os.environ, **(env or {})})


@pytest.fixture(autouse=True)
def cli_reaches_the_api(api_server, monkeypatch):
    monkeypatch.setenv("ANDON_API_URL", api_server)


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


@pytest.mark.parametrize("args", [["reap"], ["prune", "--older-than", "30d"]])
def test_a_local_verb_with_its_database_out_of_reach_prints_one_line(args):
    """The verbs that write rows here: the database's own words, no traceback."""
    done = andon(*args, env={"ANDON_DATABASE_URL": "postgresql+psycopg://nobody:wrong@127.0.0.1:1/none"})
    assert done.returncode == 1 and done.stderr.startswith("andon: database error: "), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_cancelling_a_finished_job_is_an_error(worker):
    job_id = andon("submit", "One. Two.").stdout.strip()
    wait_terminal(job_id)
    done = andon("cancel", job_id)
    assert done.returncode == 1 and "already completed" in done.stderr


def test_an_unreachable_api_is_one_line(worker):
    for args in (["submit", "x"], ["ls"], ["show", "x"], ["cancel", "a", "b"], ["cancel", "--all", "--tag", "t"]):
        done = andon(*args, env={"ANDON_API_URL": "http://127.0.0.1:1"})
        assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "cannot reach the API at http://127.0.0.1:1" in done.stderr and "Traceback" not in done.stderr


def test_job_verbs_need_no_database_or_redis(worker):
    """Only the API's URL and token: a database or Redis the CLI can't reach doesn't matter."""
    nowhere = {"ANDON_DATABASE_URL": "postgresql+psycopg://nobody:wrong@127.0.0.1:1/none",
               "ANDON_REDIS_URL": "redis://127.0.0.1:1/0", "ANDON_BROKER_URL": "redis://127.0.0.1:1/0"}
    submitted = andon("submit", "--json", "--stage-delay", "0.05", *[f"D{i}." for i in range(40)], env=nowhere)
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["job_id"]
    wait_items(job_id, 1)
    assert andon("cancel", job_id, "--message", "laptop", env=nowhere).returncode == 0
    job = wait_terminal(job_id)
    assert (job.status, job.cancellation_source, job.cancellation_message) == ("cancelled", "cli", "laptop")
    for args, needle in ((["show", job_id], job_id), (["ls", "--json"], job_id), (["results", job_id], "Partial results"),
                         (["pipelines"], "documents"), (["watch", job_id, "--json"], '"event": "end"')):
        done = andon(*args, env=nowhere)
        assert done.returncode == 0 and needle in done.stdout, (args, done.stderr)
    resumed = andon("resume", job_id, "--force", "--json", env=nowhere)
    assert resumed.returncode == 0 and json.loads(resumed.stdout)["resumed_from"] == job_id, resumed.stderr
    wait_terminal(json.loads(resumed.stdout)["job_id"])


def test_bulk_cancel_from_the_cli_is_recorded_as_cli(worker):
    ids = [json.loads(andon("submit", "--json", "--tag", "cli-bulk", "--stage-delay", "0.05",
                            *[f"D{i}." for i in range(100)]).stdout)["job_id"] for _ in range(2)]
    done = andon("cancel", "--all", "--tag", "cli-bulk", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["matched"] == 2, done.stderr
    assert {wait_terminal(job_id).cancellation_source for job_id in ids} == {"cli"}


def test_ls_filters_and_limits_over_http(worker):
    ids = {json.loads(andon("submit", "--json", "--tag", "cli-pages", "x").stdout)["job_id"] for _ in range(3)}
    listed = json.loads(andon("ls", "--tag", "cli-pages", "--limit", "2", "--json").stdout)
    assert len(listed) == 2 and {j["job_id"] for j in listed} < ids
    everything = json.loads(andon("ls", "--tag", "cli-pages", "--json").stdout)
    assert {j["job_id"] for j in everything} == ids
    for job_id in ids:
        wait_terminal(job_id)


def test_a_422_from_the_api_is_one_line_naming_the_field(worker):
    done = andon("submit", "--deadline", "1e12", "x")
    assert done.returncode == 1 and "deadline_s" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
