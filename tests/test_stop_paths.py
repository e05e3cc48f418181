"""Every way Celery stops a task ends as one structured reason (DESIGN.md, "How Celery stop paths
map onto reasons"), against real prefork workers, real signals and a real Flower."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from celery.result import AsyncResult

from db.settings import get_settings
from tasks.app import app
from tests.jobs_helpers import (
    PIPELINES,
    assert_one_terminal,
    events,
    items,
    job_row,
    submit,
    wait_items,
    wait_status,
    wait_terminal,
)
from tests.procs import wait_for


def assert_stopped(job_id, reason, source, *, min_items=0, celery_state="REVOKED", timeout=30):
    """The promise: one terminal state, the reason and source, finished items kept, nothing after
    the stop was observed, no temp dir, and Celery's own state not SUCCESS."""
    job = wait_terminal(job_id, timeout)
    assert (job.status, job.cancellation_reason, job.cancellation_source) == ("cancelled", reason, source), (
        job.status, job.cancellation_reason, job.cancellation_source, job.error)
    assert_one_terminal(job_id)
    rows = items(job_id)
    done = [r for r in rows if r.status == "done"]
    assert min_items <= job.completed_items < job.total_items
    assert len(done) == job.completed_items and len({r.index for r in rows}) == len(rows)
    assert all(r.finished_at <= job.cancel_observed_at for r in rows)
    assert not (get_settings().jobs_tmp_dir / job_id).exists()
    if celery_state:
        wait_for(lambda: AsyncResult(job_id, app=app).state == celery_state, 20,
                 what=f"Celery state {celery_state} (is {AsyncResult(job_id, app=app).state})")
    return job


# --- revoke: control.revoke, `celery control revoke`, Flower's Revoke button -----------------------


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_control_revoke_stops_a_running_job_at_its_next_checkpoint(worker, pipeline):
    job_id = submit(30, stage_delay_s=0.03, pipeline=pipeline)
    wait_items(job_id, 3)
    app.control.revoke(job_id)
    assert_stopped(job_id, "user_requested", "revoke", min_items=3)
    requested = [e for e in events(job_id) if e.kind == "cancel_requested"]
    assert len(requested) == 1 and requested[0].source == "revoke"


def test_revoke_carries_a_reason_and_message(worker):
    job_id = submit(30, stage_delay_s=0.03)
    wait_items(job_id, 2)
    app.control.revoke(job_id, reason="resource_limit", message="GPU quota exhausted")
    job = assert_stopped(job_id, "resource_limit", "revoke", min_items=2)
    assert job.cancellation_message == "GPU quota exhausted"


def test_celery_control_revoke_command_line(worker):
    job_id = submit(200, stage_delay_s=0.03)  # long enough to outlast starting the celery command
    wait_items(job_id, 2)
    done = subprocess.run([sys.executable, "-m", "celery", "-A", "tasks.app", "control", "revoke", job_id],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert_stopped(job_id, "user_requested", "revoke", min_items=2)


def test_revoking_a_queued_job_cancels_it_without_running(start_worker):
    w = start_worker(concurrency=1)
    blocker = submit(300, stage_delay_s=0.05, queue=w.queue)
    wait_status(blocker, "running")
    queued = submit(3, queue=w.queue)
    app.control.revoke(queued)
    job = wait_status(queued, "cancelled", timeout=10)
    assert job.started_at is None and job.cancellation_source == "revoke"
    app.control.revoke(blocker)
    assert_stopped(blocker, "user_requested", "revoke")
    wait_for(lambda: AsyncResult(queued, app=app).state == "REVOKED", 20)
    assert items(queued) == [] and "started" not in [e.kind for e in events(queued)]


def test_flower_revoke_button_stops_a_running_job(flower):
    job_id = submit(30, stage_delay_s=0.03)
    wait_items(job_id, 3)
    answer = flower.post(f"/api/task/revoke/{job_id}", data={"terminate": "false"})
    assert answer.status_code == 200, answer.text
    assert_stopped(job_id, "user_requested", "revoke", min_items=3)
    task = wait_for(lambda: (t := flower.get(f"/api/task/info/{job_id}").json()).get("state") == "REVOKED" and t,
                    20, what="Flower to show REVOKED")
    assert "user_requested (revoke)" in (task.get("exception") or "")


def test_flower_needs_its_basic_auth(flower):
    import httpx

    assert httpx.get(f"{flower.base_url}/api/workers", timeout=10).status_code == 401


# --- terminate: cooperative first, the signal only after a grace period -----------------------------


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_flower_terminate_keeps_finished_items(flower, pipeline):
    job_id = submit(30, stage_delay_s=0.03, pipeline=pipeline)
    wait_items(job_id, 3)
    answer = flower.post(f"/api/task/revoke/{job_id}", data={"terminate": "true", "signal": "SIGTERM"})
    assert answer.status_code == 200, answer.text
    assert_stopped(job_id, "user_requested", "revoke", min_items=3)
    wait_for(lambda: flower.get(f"/api/task/info/{job_id}").json().get("state") == "REVOKED", 20)


def test_terminate_stops_a_cooperative_job_without_killing_its_process(start_worker):
    w = start_worker(concurrency=1, ANDON_TERMINATE_GRACE_S="1")
    job_id = submit(40, stage_delay_s=0.03, queue=w.queue)
    wait_items(job_id, 3)
    children = w.child_pids()
    app.control.revoke(job_id, terminate=True, signal="SIGKILL")
    assert_stopped(job_id, "user_requested", "revoke", min_items=3)
    time.sleep(1.5)  # past the grace period: the signal must have found nothing to kill
    assert w.child_pids() == children


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_terminate_signals_a_stuck_job_after_the_grace_period(start_worker, sig):
    w = start_worker(concurrency=1, ANDON_TERMINATE_GRACE_S="1")
    job_id = submit(1, queue=w.queue, pipeline="user-sync", options={"block_s": 30})  # deaf to its token
    wait_status(job_id, "running")
    time.sleep(0.3)
    started = time.monotonic()
    app.control.revoke(job_id, terminate=True, signal=sig)
    assert_stopped(job_id, "user_requested", "revoke", timeout=15)
    assert 0.9 <= time.monotonic() - started < 10
    assert "cancel_requested" in [e.kind for e in events(job_id)]


# --- timeouts: job deadline, Celery soft and hard time limits -----------------------------------


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_job_deadline_cancels_with_timeout(worker, pipeline):
    job_id = submit(40, stage_delay_s=0.03, deadline_s=0.8, pipeline=pipeline)
    job = assert_stopped(job_id, "timeout", "deadline", min_items=1)
    assert job.resumable is True


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_soft_time_limit_becomes_a_timeout_cancel_at_a_checkpoint(worker, pipeline):
    job_id = submit(40, stage_delay_s=0.03, pipeline=pipeline, options={"soft_time_limit_s": 0.8, "time_limit_s": 30})
    job = assert_stopped(job_id, "timeout", "time_limit", min_items=1)
    assert job.resumable is True and "soft time limit" in job.cancellation_message


def test_hard_time_limit_finalizes_the_row_from_the_main_process(start_worker):
    w = start_worker(concurrency=1)
    job_id = submit(3, queue=w.queue, pipeline="user-sync", options={"block_s": 0.9, "time_limit_s": 2})
    job = assert_stopped(job_id, "timeout", "time_limit", min_items=1, celery_state="FAILURE")
    assert "hard time limit" in job.cancellation_message


# --- worker shutdown: warm (SIGTERM) and cold (SIGQUIT) --------------------------------------------


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_warm_shutdown_cancels_running_jobs_resumably_and_exits_promptly(start_worker, pipeline):
    w = start_worker(concurrency=1)
    job_id = submit(100, stage_delay_s=0.03, queue=w.queue, pipeline=pipeline)
    wait_items(job_id, 3)
    started = time.monotonic()
    w.send_signal(signal.SIGTERM)
    w.proc.wait(timeout=20)
    assert time.monotonic() - started < 10
    job = assert_stopped(job_id, "system_shutdown", "worker_shutdown", min_items=3)
    assert job.resumable is True


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_cold_shutdown_ends_in_the_same_state_within_a_bounded_time(start_worker, pipeline):
    w = start_worker(concurrency=1, ANDON_COLD_SHUTDOWN_GRACE_S="1")
    job_id = submit(100, stage_delay_s=0.03, queue=w.queue, pipeline=pipeline)
    wait_items(job_id, 3)
    started = time.monotonic()
    w.send_signal(signal.SIGQUIT)
    w.proc.wait(timeout=30)
    assert time.monotonic() - started < 15
    job = assert_stopped(job_id, "system_shutdown", "worker_shutdown", min_items=3)
    assert job.resumable is True


# --- lost workers: SIGKILLed child, whole worker gone ---------------------------------------------


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_a_sigkilled_child_is_requeued_once_and_resumes_where_it_stopped(start_worker, pipeline):
    w = start_worker(concurrency=1)
    job_id = submit(20, stage_delay_s=0.03, queue=w.queue, pipeline=pipeline)
    wait_items(job_id, 3)
    os.kill(w.child_pids()[0], signal.SIGKILL)
    job = wait_terminal(job_id, timeout=60)
    assert job.status == "completed" and job.completed_items == job.total_items
    rows = items(job_id)
    assert sorted(r.index for r in rows) == list(range(job.total_items))  # no item ran twice
    kinds = [e.kind for e in events(job_id)]
    assert kinds.count("requeued") == 1 and kinds.count("started") == 2
    assert_one_terminal(job_id)


def test_a_job_that_loses_its_worker_twice_fails_with_the_cause(start_worker):
    w = start_worker(concurrency=1)
    job_id = submit(200, stage_delay_s=0.03, queue=w.queue)
    wait_items(job_id, 2)
    os.kill(w.child_pids()[0], signal.SIGKILL)
    wait_for(lambda: [e.kind for e in events(job_id)].count("started") == 2, 30, what="the job to restart")
    wait_items(job_id, job_row(job_id).completed_items + 1)
    os.kill(w.child_pids()[0], signal.SIGKILL)
    job = wait_terminal(job_id, timeout=30)
    assert job.status == "failed" and "lost 2 times" in job.error
    assert_one_terminal(job_id)
    assert not (get_settings().jobs_tmp_dir / job_id).exists()


def test_the_reaper_gives_back_a_job_whose_whole_worker_vanished(start_worker):
    w = start_worker(concurrency=1, ANDON_HEARTBEAT_S="0.3")
    job_id = submit(200, stage_delay_s=0.03, queue=w.queue)
    wait_items(job_id, 2)
    os.killpg(w.proc.pid, signal.SIGKILL)  # main process and children: no hook runs anywhere
    w.proc.wait(10)
    time.sleep(1.2)  # the heartbeat key (3 beats) expires
    env = {**os.environ, "ANDON_HEARTBEAT_S": "0.3"}
    done = subprocess.run([str(os.path.join(os.path.dirname(sys.executable), "andon")), "reap", "--json"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert job_id in done.stdout
    job = job_row(job_id)  # back in the queue with a new message, its finished items kept
    assert job.status == "pending" and job.completed_items >= 2
    assert [e.kind for e in events(job_id)].count("requeued") == 1
    assert not (get_settings().jobs_tmp_dir / job_id).exists()
    start_worker(concurrency=1, queue=w.queue)  # a worker serving that queue again runs the rest
    job = wait_terminal(job_id, timeout=60)
    assert job.status == "completed" and job.completed_items == job.total_items
    assert sorted(r.index for r in items(job_id)) == list(range(job.total_items))  # no item ran twice
    assert_one_terminal(job_id)


# --- memory: the RSS watchdog ---------------------------------------------------------------------


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_rss_watchdog_cancels_with_resource_limit(start_worker, pipeline):
    w = start_worker(concurrency=1, ANDON_HEARTBEAT_S="0.3")
    job_id = submit(100, stage_delay_s=0.03, queue=w.queue, pipeline=pipeline, options={"max_rss_mb": 1})
    job = assert_stopped(job_id, "resource_limit", "memory_watchdog")
    assert "MiB" in job.cancellation_message


def test_rss_watchdog_then_the_ladder_kill_a_job_blocked_in_a_system_call(start_worker):
    w = start_worker(concurrency=1, ANDON_HEARTBEAT_S="0.3")
    job_id = submit(1, queue=w.queue, pipeline="user-sync", options={"max_rss_mb": 1, "block_s": 30,
                                                                      "escalate_after_s": 0.3, "kill_after_s": 0.8})
    assert_stopped(job_id, "resource_limit", "memory_watchdog", celery_state=None, timeout=20)
    steps = [e.detail["step"] for e in events(job_id) if e.kind == "escalated"]
    assert steps == ["raise CancellationError into the job's stages", "kill the worker child"]


# --- the escalation ladder: for work that ignores its token ---------------------------------------


@pytest.mark.parametrize("pipeline", ["user-sync", "user-mixed"])  # in the job's thread; in a stage thread
def test_the_ladder_raises_into_a_stuck_loop_and_the_job_ends_cancelled(worker, pipeline):
    job_id = submit(3, stage_delay_s=0.01, pipeline=pipeline, options={"spin_s": 30, "escalate_after_s": 0.5,
                                                                       "kill_after_s": 10})
    wait_status(job_id, "running")
    time.sleep(0.3)
    requested = time.monotonic()
    app.control.revoke(job_id, reason="user_requested")
    job = assert_stopped(job_id, "user_requested", "revoke", timeout=15)
    assert time.monotonic() - requested < 5
    escalations = [e for e in events(job_id) if e.kind == "escalated"]
    assert [e.detail["step"] for e in escalations] == ["raise CancellationError into the job's stages"]
    assert 0.5 <= escalations[0].detail["after_s"] < 2
    assert job.cancel_observed_at is not None


def test_revoke_by_stamped_headers_stops_matching_running_jobs(worker):
    import uuid

    from celery.canvas import StampingVisitor

    from db import jobs as job_rows
    from db.session import session_scope
    from tests.jobs_helpers import docs

    class Campaign(StampingVisitor):
        def on_signature(self, sig, **headers):
            return {"campaign": "spring-batch"}

    stamped = str(uuid.uuid4())
    with session_scope() as session:
        job_rows.create_job(session, stamped, docs(30), {"stage_delay_s": 0.03})
    signature = app.signature("andon.run_pipeline", args=[stamped], immutable=True)
    signature.stamp(visitor=Campaign())
    signature.apply_async(task_id=stamped)
    wait_items(stamped, 2)
    app.control.revoke_by_stamped_headers({"campaign": "spring-batch"})
    assert_stopped(stamped, "user_requested", "revoke", min_items=2, celery_state=None)
