"""Users' own pipelines (tests/fixtures/andon_test_pipelines.py, loaded through ANDON_PIPELINES from a
temp dir on PYTHONPATH) through every door: the HTTP API, the CLI, ``send_task`` and ``run_local``."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from celery.result import AsyncResult

from api import service
from db.settings import get_settings
from tasks import CancellationError, CancellationToken, JobContext, Pipeline, stage
from tasks.app import app
from tasks.errors import PipelineError
from tests.jobs_helpers import events, items, job_row, submit, wait_items, wait_status, wait_terminal
from tests.procs import wait_for

ANDON = str(Path(sys.executable).parent / "andon")


def andon(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([ANDON, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


# --- the doors ------------------------------------------------------------------------------------


def test_pipelines_are_listed_over_http_and_the_cli(api_client, api_server):
    listed = {p["name"]: p for p in api_client.get("/api/pipelines").json()}
    assert listed["documents"]["stages"] == ["parse", "embed", "analyze"]
    assert listed["user-async"] == {"name": "user-async", "stages": ["fetch", "llm", "finish"], "concurrency": 4,
                                    "description": "async stages, four items in flight", "queue": None}
    assert listed["user-queued"]["queue"] == "andon-test-special"
    shown = andon("pipelines", "--json", env={"ANDON_API_URL": api_server})
    assert shown.returncode == 0, shown.stderr
    assert {p["name"] for p in json.loads(shown.stdout)} >= {"documents", "user-sync", "user-async"}
    assert "user-mixed" in andon("pipelines", env={"ANDON_API_URL": api_server}).stdout


@pytest.mark.parametrize("pipeline", ["user-sync", "user-async", "user-mixed"])
def test_a_user_pipeline_runs_to_completion_through_the_api(api_client, pipeline):
    answer = api_client.post("/api/jobs", json={"pipeline": pipeline, "items": ["a", {"b": 1}, 3, None],
                                                "options": {"fail_every": 3}})
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["job_id"]
    job = wait_terminal(job_id)
    assert job.status == "completed" and (job.completed_items, job.failed_items) == (2, 2)
    assert api_client.get(f"/api/jobs/{job_id}").json()["pipeline"] == pipeline
    partial = api_client.get(f"/api/jobs/{job_id}/partial-results").json()
    assert [r["index"] for r in partial["results"]] == [1, 2]
    assert partial["results"][0]["result"]["item"] == {"b": 1} and partial["results"][0]["result"]["done"] is True
    assert [(f["index"], f["error"]) for f in partial["failed_items"]] == [(0, "ValueError: item 0 is bad"),
                                                                          (3, "ValueError: item 3 is bad")]
    assert partial["interrupted_items"] == []


def test_bad_submissions_are_422s_that_name_the_field(api_client):
    def post(body):
        return api_client.post("/api/jobs", json=body)

    unknown = post({"pipeline": "nope", "items": [1]})
    assert unknown.status_code == 422 and "known: documents" in unknown.json()["detail"]
    assert "user-sync" in unknown.json()["detail"]
    assert post({"items": ["a"], "documents": ["a"]}).status_code == 422
    assert post({"pipeline": "user-sync", "documents": ["a"]}).status_code == 422
    assert post({"pipeline": "user-sync"}).status_code == 422
    typed = post({"pipeline": "user-tickets", "items": [{"title": "ok", "priority": 2}, {"title": "", "priority": 9}]})
    assert typed.status_code == 422
    locs = [tuple(e["loc"]) for e in typed.json()["detail"]]
    assert ("body", "items", 1, "title") in locs and ("body", "items", 1, "priority") in locs
    no_options = post({"pipeline": "user-tickets", "items": [{"title": "x", "priority": 1}], "options": {"x": 1}})
    assert no_options.status_code == 422 and no_options.json()["detail"][0]["loc"] == ["body", "options", "x"]
    wrong_option = post({"pipeline": "user-sync", "items": [1], "options": {"stage_delay_s": "slow"}})
    assert wrong_option.status_code == 422
    # andon's own options are accepted for every pipeline; a closed schema refuses the rest
    assert post({"pipeline": "user-tickets", "items": [{"title": "x", "priority": 1}],
                 "options": {"time_limit_s": 60, "escalate_after_s": 1}}).status_code == 202
    assert post({"documents": ["a"], "options": {"stage_block_s": 1}}).status_code == 422  # no fault knobs
    typed_ok = post({"pipeline": "user-tickets", "items": [{"title": "urgent thing", "priority": 5}]})
    job = wait_terminal(typed_ok.json()["job_id"])
    assert job.status == "completed"
    assert items(job.id)[0].result == {"title": "URGENT THING", "urgent": True}


def test_the_cli_submits_to_a_user_pipeline(worker, api_server, tmp_path, monkeypatch):
    monkeypatch.setenv("ANDON_API_URL", api_server)  # the CLI's job verbs speak HTTP
    done = andon("submit", "--pipeline", "user-sync", "--json-items", '{"n": 1}', "[2]", "--json")
    assert done.returncode == 0, done.stderr
    job = wait_terminal(json.loads(done.stdout)["job_id"])
    assert job.status == "completed" and job.inputs == [{"n": 1}, [2]]
    lines = tmp_path / "items.jsonl"
    lines.write_text('{"title": "a", "priority": 1}\n\n{"title": "b", "priority": 4}\n')
    from_file = andon("submit", "--pipeline", "user-tickets", "--items-file", str(lines))
    assert from_file.returncode == 0, from_file.stderr
    assert wait_terminal(from_file.stdout.strip()).completed_items == 2
    bad = andon("submit", "--pipeline", "user-tickets", "--json-items", '{"title": "a"}')
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1 and "priority" in bad.stderr
    not_json = andon("submit", "--pipeline", "user-sync", "--json-items", "{oops")
    assert not_json.returncode == 2 and "not JSON" in not_json.stderr and "Traceback" not in not_json.stderr


def test_send_task_by_name_runs_a_user_pipeline(worker):
    job_id = str(uuid.uuid4())
    app.send_task("andon.run_pipeline", kwargs={"pipeline": "user-async", "items": [1, 2, 3]}, task_id=job_id)
    job = wait_terminal(job_id)
    assert (job.status, job.pipeline, job.completed_items) == ("completed", "user-async", 3)
    assert events(job_id)[0].actor == "send_task"
    wait_for(lambda: AsyncResult(job_id, app=app).state == "SUCCESS", 20)


def test_send_task_with_a_hostile_id_or_body_makes_no_job(worker):
    for bad_id in ("/tmp", "../../etc", "a" * 80):
        app.send_task("andon.run_pipeline", kwargs={"pipeline": "user-sync", "items": [1]}, task_id=bad_id)
    unknown = str(uuid.uuid4())
    app.send_task("andon.run_pipeline", kwargs={"pipeline": "no-such-pipeline", "items": [1]}, task_id=unknown)
    invalid = str(uuid.uuid4())
    app.send_task("andon.run_pipeline", kwargs={"pipeline": "user-tickets", "items": [{"title": 1}]}, task_id=invalid)
    wait_for(lambda: AsyncResult(invalid, app=app).state == "FAILURE", 20, what="the invalid message to fail")
    assert "items.0" in str(AsyncResult(invalid, app=app).result)
    # a pipeline no worker here knows goes back to the queue (a rolling deploy), never dropped
    wait_for(lambda: AsyncResult(unknown, app=app).state == "RETRY", 20, what="the unknown pipeline sent back")
    assert job_row(invalid) is None and job_row(unknown) is None
    assert os.path.isdir("/tmp")


# --- cancelling async work in flight --------------------------------------------------------------


def test_a_cancel_interrupts_every_async_item_in_flight(worker):
    job_id = submit(40, stage_delay_s=5, pipeline="user-async")  # four items, each in a 5 s await
    wait_status(job_id, "running")
    time.sleep(0.3)
    service.cancel_job(job_id, message="stop now")
    job = wait_terminal(job_id, timeout=10)
    assert job.status == "cancelled" and job.cancellation_reason == "user_requested"
    latency_ms = (job.cancel_observed_at - job.cancel_requested_at).total_seconds() * 1000
    assert latency_ms < 1000, latency_ms  # the await is cancelled, not waited out (make bench has the figure)
    rows = items(job_id)
    assert sorted((r.index, r.status, r.stage) for r in rows) == [(i, "interrupted", "fetch") for i in range(4)]
    assert job.completed_items == job.failed_items == 0 and job.cancelled_at_item == 0
    partial = service.partial_results(job_id)
    assert [(i.index, i.stage) for i in partial.interrupted_items] == [(i, "fetch") for i in range(4)]
    assert not (get_settings().jobs_tmp_dir / job_id).exists()


@pytest.mark.parametrize("pipeline", ["user-swallow-sync", "user-swallow-async"])
def test_a_stage_catching_exception_still_gets_cancelled(worker, pipeline):
    job_id = service.submit_job(["x", "y"], pipeline=pipeline).job_id
    wait_status(job_id, "running")
    time.sleep(0.3)
    started = time.monotonic()
    service.cancel_job(job_id)
    job = wait_terminal(job_id, timeout=10)
    assert time.monotonic() - started < 3
    assert job.status == "cancelled" and job.completed_items == 0
    assert [r.status for r in items(job_id)] == ["interrupted"] * len(items(job_id)) and items(job_id)


def test_resume_of_an_async_job_runs_only_what_was_not_done(worker):
    job_id = submit(40, stage_delay_s=0.05, pipeline="user-async")
    wait_items(job_id, 8)
    service.cancel_job(job_id, reason="timeout")
    old = wait_terminal(job_id)
    done = {r.index for r in items(job_id) if r.status == "done"}
    interrupted = {r.index for r in items(job_id) if r.status == "interrupted"}
    assert old.status == "cancelled" and len(done) >= 8 and interrupted
    new_id = service.resume_job(job_id).job_id
    new = wait_terminal(new_id)
    assert new.status == "completed" and new.completed_items == new.total_items
    reran = [e for e in events(new_id) if e.kind == "resumed"][0].detail["reused_items"]
    assert reran == len(done)
    assert sorted(r.index for r in items(new_id)) == list(range(new.total_items))


# --- a worker that doesn't know the pipeline ------------------------------------------------------


def test_a_bad_andon_pipelines_stops_the_worker_with_one_line(tmp_path):
    from tests.procs import WorkerProcess

    (tmp_path / "andon_dup_pipes.py").write_text('from tasks import Pipeline\nPipeline("user-sync", [str.strip])\n')
    (tmp_path / "andon_broken_pipes.py").write_text('from tasks import Pipeline\nPipeline("broken", [42])\n')
    path = os.pathsep.join([str(tmp_path), os.environ["PYTHONPATH"]])
    home = get_settings().home_dir
    for value, expected in (("no_such_module", "cannot import 'no_such_module'"),
                            ("andon_test_pipelines,andon_dup_pipes", "'user-sync' is registered twice"),
                            ("andon_broken_pipes", "stage 42 is not callable")):
        worker = WorkerProcess(f"bad-{uuid.uuid4().hex[:6]}", home / "logs", 1,
                               env={"ANDON_PIPELINES": value, "PYTHONPATH": path})
        with pytest.raises(AssertionError, match="exited with code 2"):
            worker.start(timeout=30)
        lines = [line for line in worker.logs().splitlines() if line.startswith("andon worker:")]
        assert len(lines) == 1 and expected in lines[0], worker.logs()[-2000:]
        assert "Traceback" not in worker.logs()


def test_an_unknown_pipeline_goes_back_to_the_queue_for_a_worker_that_knows_it(start_worker):
    stranger = start_worker(concurrency=1, ANDON_PIPELINES="")
    job_id = service.submit_job([1, 2], pipeline="user-sync", queue=stranger.queue).job_id
    wait_for(lambda: "Retry in" in stranger.logs() or "retry" in stranger.logs().lower(), 30,
             what="the stranger to send the job back")
    assert job_row(job_id).status == "pending"  # never dropped, never failed
    stranger.stop()
    knower = start_worker(concurrency=1, queue=stranger.queue)
    job = wait_terminal(job_id, timeout=60)
    assert job.status == "completed" and knower.proc.poll() is None


def test_a_pipeline_with_a_queue_runs_on_the_workers_serving_it(start_worker):
    start_worker(concurrency=1, queue="andon-test-special")
    job = wait_terminal(service.submit_job(["q"], pipeline="user-queued").job_id, timeout=60)
    assert job.status == "completed" and items(job.id)[0].result == {"item": "q"}


# --- the Python API itself (no worker, no Redis, no database) --------------------------------------


def test_run_local_runs_a_pipeline_in_process_and_a_cancel_stops_it():
    async def slow(value, ctx: JobContext):
        await ctx.sleep(30 if value == "slow" else 0)
        return value.upper()

    pipeline = Pipeline("local-test", [str.strip, stage(slow, name="shout")], concurrency=3, register=False)
    assert pipeline.run_local(["  a ", "b"]).results == {0: "A", 1: "B"}
    token = CancellationToken("local")
    threading.Timer(0.3, token.cancel).start()
    started = time.monotonic()
    run = pipeline.run_local(["a", "slow", "slow", "b"], token=token)
    assert time.monotonic() - started < 5
    assert isinstance(run.cancelled, CancellationError) and run.interrupted == {1: "shout", 2: "shout"}
    assert run.results == {0: "A", 3: "B"}


def test_results_must_survive_a_strict_json_round_trip():
    pipeline = Pipeline("json-test", [lambda_free_nan], register=False)
    run = pipeline.run_local([1.0, math.nan, "\x00", "fine"])
    assert run.results == {0: 1.0, 3: "fine"}
    assert "JSON" in run.failed[1] and "NUL" in run.failed[2]


def lambda_free_nan(value):
    return value


def three_arguments(a, b, c):
    return a


def test_pipeline_definitions_fail_at_once_with_a_clear_error():
    with pytest.raises(PipelineError, match="registered twice"):
        Pipeline("user-sync", [lambda_free_nan])
    with pytest.raises(PipelineError, match="not callable"):
        Pipeline("x-1", ["not a function"], register=False)
    with pytest.raises(PipelineError, match=r"\(value\) or \(value, ctx\)"):
        Pipeline("x-2", [three_arguments], register=False)
    with pytest.raises(PipelineError, match="stage name"):
        stage(lambda_free_nan, name="x" * 65)
    with pytest.raises(PipelineError, match="concurrency"):
        Pipeline("x-3", [lambda_free_nan], concurrency=0, register=False)


def test_a_bad_andon_pipelines_stops_andon_up_before_anything_starts(tmp_path):
    done = andon("up", "--api-port", "1", "--flower-port", "2", "--redis-port", "3",
                 env={"ANDON_PIPELINES": "no_such_module", "ANDON_HOME": str(tmp_path / "home")})
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "andon: ANDON_PIPELINES: cannot import 'no_such_module': No module named 'no_such_module'"]
    assert not (tmp_path / "home" / "stack.json").exists()
