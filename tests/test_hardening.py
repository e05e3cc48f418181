"""Hostile callers and harsher faults (issue 11): job ids are not paths, one owner per job, a Redis
pause or a database lock is a blip that no job pays for with a `failed`, and operator limits are
ceilings. Real processes throughout: the session's Redis and SQLite, prefork workers, signals."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
import uuid

import pytest
from celery.result import AsyncResult
from sqlalchemy import update

from api import service
from db import jobs as job_rows
from db.jobs import NotOwner
from db.models import Job
from db.session import transaction
from db.settings import get_settings
from db.vocabulary import ItemStatus, JobStatus
from tasks.app import app
from tasks.errors import InvalidJobId
from tasks.paths import check_job_id, contained, job_scratch_dir, remove_tree
from tests.jobs_helpers import assert_one_terminal, events, items, job_row, submit, wait_items, wait_terminal
from tests.procs import wait_for


def kinds(job_id: str) -> list[str]:
    return [e.kind for e in events(job_id)]


def assert_ran_once(job) -> None:
    rows = items(job.id)
    assert sorted(r.index for r in rows) == list(range(job.total_items))  # every item once, none twice
    assert job.completed_items == len([r for r in rows if r.status == "done"])


# --- 1. a job id is not a path ---------------------------------------------------------------------


@pytest.mark.parametrize("job_id", ["/tmp/x", "../../etc", "a/b", "", "a" * 37, ".", "..", "x y", "é", None, 7])
def test_job_ids_that_are_not_ids_are_refused(job_id):
    with pytest.raises(InvalidJobId):
        check_job_id(job_id)
    if isinstance(job_id, str) and job_id:
        with pytest.raises(InvalidJobId):
            job_scratch_dir(job_id)


def test_every_path_built_or_removed_stays_under_the_jobs_root(tmp_path):
    root = get_settings().jobs_tmp_dir
    job_id = str(uuid.uuid4())
    assert job_scratch_dir(job_id) == root.resolve() / job_id
    assert job_scratch_dir(job_id, run=3).parent == root.resolve() / job_id
    outside = tmp_path / "precious"
    outside.mkdir()
    for escape in (outside, root / ".." / "precious", root, root / job_id / ".." / ".."):
        with pytest.raises(InvalidJobId):
            remove_tree(escape)
    (root / "link").parent.mkdir(parents=True, exist_ok=True)
    (root / "link").symlink_to(outside)
    try:
        with pytest.raises(InvalidJobId):  # a link out of the root resolves outside it
            contained(root / "link", root)
    finally:
        (root / "link").unlink()
    assert outside.exists()


def test_a_message_with_a_path_for_an_id_deletes_nothing(worker, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    marker = str(uuid.uuid4())
    for form in ({"kwargs": {"documents": ["x"]}}, {"args": [str(precious)]},
                 {"kwargs": {"pipeline": "user-sync", "items": [1]}}):
        app.send_task("andon.analyze_documents" if "documents" in form.get("kwargs", {}) else "andon.run_pipeline",
                      task_id=str(precious), **form)
    app.send_task("andon.run_pipeline", kwargs={"pipeline": "user-sync", "items": [marker]}, task_id=marker)
    wait_terminal(marker)  # the worker got past the hostile messages
    assert (precious / "keep.txt").read_text() == "mine"
    assert job_row(str(precious)) is None


# --- 3. one owner at a time ------------------------------------------------------------------------


def test_a_second_delivery_while_the_owner_runs_does_nothing(worker):
    job_id = submit(30, stage_delay_s=0.04, pipeline="user-sync")
    wait_items(job_id, 3)
    for _ in range(2):  # Flower's apply, send_task with the same id, a redelivery: all alike
        app.send_task("andon.run_pipeline", args=[job_id], task_id=job_id)
    wait_for(lambda: "duplicate_skipped" in kinds(job_id), 30, what="the duplicate to be skipped")
    job = wait_terminal(job_id, timeout=60)
    assert job.status == "completed", (job.status, job.error)
    assert_ran_once(job)
    assert kinds(job_id).count("started") == 1 and "failed" not in kinds(job_id)
    wait_for(lambda: AsyncResult(job_id, app=app).state == "SUCCESS", 20)


def test_a_delivery_takes_over_from_a_dead_owner_and_runs_only_the_rest(start_worker):
    first = start_worker(concurrency=1, ANDON_HEARTBEAT_S="0.3")
    job_id = submit(40, stage_delay_s=0.04, pipeline="user-sync", queue=first.queue)
    wait_items(job_id, 4)
    os.killpg(first.proc.pid, signal.SIGKILL)  # the owner dies without a word; its row says running
    first.proc.wait(10)
    done_before = job_row(job_id).completed_items
    app.send_task("andon.run_pipeline", args=[job_id], task_id=job_id, queue=first.queue)  # a redelivery
    start_worker(concurrency=1, queue=first.queue, ANDON_HEARTBEAT_S="0.3")
    job = wait_terminal(job_id, timeout=60)
    assert job.status == "completed", (job.status, job.error)
    assert_ran_once(job)
    assert done_before >= 4
    assert "taken_over" in kinds(job_id) or "requeued" in kinds(job_id)  # the delivery, or the reaper, first
    assert_one_terminal(job_id)


def test_the_fence_stops_a_run_that_lost_its_job(db_url):
    from db.session import session_scope as scope

    job_id = str(uuid.uuid4())
    with scope(db_url) as session:
        job_rows.create_job(session, job_id, ["a", "b", "c"], {})
    with scope(db_url) as session:
        assert job_rows.transition(session, job_id, JobStatus.RUNNING, raise_fence=True, owner="first")
    with scope(db_url) as session:
        assert session.get(Job, job_id).fence == 1
    with transaction(db_url) as conn:
        job_rows.record_item(conn, job_id, 0, "s", ItemStatus.DONE, result={"ok": 1}, fence=1)
    # a second run takes over: fence 2; the first can neither write an item nor end the job
    with scope(db_url) as session:
        assert session.execute(update(Job).where(Job.id == job_id)
                               .values(fence=Job.fence + 1, owner="second")).rowcount == 1
    for status in ItemStatus:
        with pytest.raises(NotOwner), transaction(db_url) as conn:
            job_rows.record_item(conn, job_id, 1, "s", status, fence=1)
    with scope(db_url) as session:
        assert not job_rows.transition(session, job_id, JobStatus.COMPLETED, fence=1)
        assert job_rows.finished_indexes(session, job_id) == {0}
    with transaction(db_url) as conn:
        job_rows.record_item(conn, job_id, 1, "s", ItemStatus.DONE, result={"ok": 2}, fence=2)
    with scope(db_url) as session:
        assert job_rows.transition(session, job_id, JobStatus.COMPLETED, fence=2)
        assert session.get(Job, job_id).completed_items == 2


# --- 4. a Redis pause is not a dead worker ---------------------------------------------------------


def test_a_redis_pause_longer_than_the_heartbeat_does_not_end_a_live_job(start_worker, redis_server):
    w = start_worker(concurrency=1, ANDON_HEARTBEAT_S="0.4")  # its beat lives 1.2 s; the pause is 3 s
    job_id = submit(60, stage_delay_s=0.04, pipeline="user-sync", queue=w.queue)
    wait_items(job_id, 3)
    os.kill(redis_server.pid, signal.SIGSTOP)
    try:
        time.sleep(3.0)
    finally:
        os.kill(redis_server.pid, signal.SIGCONT)
    job = wait_terminal(job_id, timeout=90)
    assert job.status == "completed", (job.status, job.error)
    assert_ran_once(job)
    assert "requeued" not in kinds(job_id) and kinds(job_id).count("started") == 1


# --- 5. a database blip is not a failure -----------------------------------------------------------


def hold_write_lock(seconds: float) -> threading.Thread:
    """Another process-like writer: a raw SQLite connection holding the write lock."""
    path = get_settings().resolved_database_url.split("///", 1)[1]
    ready = threading.Event()

    def hold() -> None:
        conn = sqlite3.connect(path, timeout=30, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        ready.set()
        time.sleep(seconds)
        conn.execute("ROLLBACK")
        conn.close()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    ready.wait(30)
    return thread


def test_a_write_lock_past_the_busy_timeout_is_waited_out(start_worker):
    w = start_worker(concurrency=1, ANDON_SQLITE_BUSY_TIMEOUT_MS="300", ANDON_DB_RETRY_S="30")
    job_id = submit(30, stage_delay_s=0.03, pipeline="user-sync", queue=w.queue)
    wait_items(job_id, 3)
    hold_write_lock(2.0).join(30)
    job = wait_terminal(job_id, timeout=60)
    assert job.status == "completed", (job.status, job.error)
    assert_ran_once(job)


def test_a_database_that_stays_away_stops_the_job_resumably_with_its_items_kept(start_worker):
    w = start_worker(concurrency=1, ANDON_SQLITE_BUSY_TIMEOUT_MS="200", ANDON_DB_RETRY_S="0.8")
    job_id = submit(60, stage_delay_s=0.03, pipeline="user-sync", queue=w.queue)
    wait_items(job_id, 3)
    hold_write_lock(3.0).join(30)
    job = wait_terminal(job_id, timeout=60)
    assert (job.status, job.cancellation_reason, job.cancellation_source) == (
        "cancelled", "system_shutdown", "database_unavailable"), (job.status, job.error)
    assert job.resumable and job.completed_items >= 3
    assert job.completed_items == len([r for r in items(job_id) if r.status == "done"])
    new_id = service.resume_job(job_id).job_id
    resumed = wait_terminal(new_id, timeout=60)
    assert resumed.status == "completed" and resumed.completed_items == resumed.total_items


# --- 6. operator limits are ceilings ---------------------------------------------------------------


def test_operator_limits_are_ceilings_a_job_can_only_lower(api_client, monkeypatch):
    monkeypatch.setenv("ANDON_JOB_TIME_LIMIT_S", "15")
    monkeypatch.setenv("ANDON_MAX_JOB_RSS_MB", "512")
    get_settings.cache_clear()
    try:
        def post(options):
            return api_client.post("/api/jobs", json={"documents": ["x"], "options": options})

        for options in ({"time_limit_s": 30 * 24 * 3600}, {"soft_time_limit_s": 16}, {"max_rss_mb": 1024 * 1024},
                        {"escalate_after_s": 3600}, {"kill_after_s": 3600}, {"anything": "else"},
                        {"stage_delay_s": "x" * 100_000}):
            answer = post(options)
            assert answer.status_code == 422, (options, answer.text)
            assert answer.json()["detail"][0]["loc"][:2] == ["body", "options"]
        assert post({"time_limit_s": 10, "max_rss_mb": 256}).status_code == 202
    finally:
        get_settings.cache_clear()


def test_a_revoke_whose_record_a_database_blip_cut_is_recorded_when_celery_discards_the_job(database):
    """A Flower revoke of a queued job during a database outage: andon's wrapper could not record
    it, Celery kept the id in its revoked set, and a worker discards the message later
    (``on_task_revoked`` → ``finalize_stopped``). The job ends cancelled *with* the request it ended
    for: its first ``cancel_requested`` event carries the row's reason and source."""
    from db.vocabulary import CancellationReason, CancellationSource
    from tasks.control import finalize_stopped

    job_id = service.submit_job(["a"], pipeline="user-sync", queue=f"q-none-{uuid.uuid4().hex[:8]}").job_id
    assert "cancel_requested" not in kinds(job_id)
    assert finalize_stopped(job_id, CancellationReason.USER_REQUESTED, CancellationSource.REVOKE,
                            "revoked before it started", actor="celery@test")
    job = job_row(job_id)
    assert (job.status, job.cancellation_reason, job.cancellation_source) == ("cancelled", "user_requested", "revoke")
    requested = [e for e in events(job_id) if e.kind == "cancel_requested"]
    assert [(e.reason, e.source) for e in requested] == [("user_requested", "revoke")]
    assert kinds(job_id).index("cancel_requested") < kinds(job_id).index("cancel_observed")
    assert not finalize_stopped(job_id, CancellationReason.USER_REQUESTED, CancellationSource.REVOKE)  # a 2nd worker
    assert kinds(job_id).count("cancel_requested") == 1
    assert_one_terminal(job_id)



def test_a_lost_job_a_cancel_reached_meanwhile_ends_cancelled_not_failed(database):
    """The second loss of a job races an accepted cancel: the finalizer fails only a row still
    ``running``; one the cancel moved to ``cancelling`` ends cancelled with that request."""
    from db.vocabulary import CancellationReason, CancellationSource
    from tasks import lifecycle
    from tasks.control import finalize_stopped, request_cancel

    job_id = service.submit_job(["a", "b"], pipeline="user-sync", queue=f"q-none-{uuid.uuid4().hex[:8]}").job_id
    assert lifecycle.start(job_id, owner="lost-run") is not None
    request_cancel(job_id, CancellationReason.DEPENDENCY_FAILED, "accepted after the loss", CancellationSource.API)
    assert not lifecycle.end_failed(job_id, "worker process lost 2 times", only_from=JobStatus.RUNNING)
    assert finalize_stopped(job_id, CancellationReason.USER_REQUESTED, CancellationSource.WORKER_LOST,
                            fail_with="worker process lost 2 times", actor="reaper")
    job = job_row(job_id)
    assert (job.status, job.cancellation_reason, job.cancellation_source) == ("cancelled", "dependency_failed", "api")
    assert kinds(job_id).count("cancel_requested") == 1
    assert_one_terminal(job_id)


def test_two_finalizers_racing_on_one_job_record_one_observation(database):
    """Two reapers finalize one lost run at once (both read it unfinished): the one whose terminal
    UPDATE loses writes no event either — the job is declared lost once."""
    from db.vocabulary import CancellationReason, CancellationSource
    from tasks import lifecycle
    from tasks.cancellation import CancelRequest
    from tasks.control import request_cancel

    job_id = service.submit_job(["a", "b"], pipeline="user-sync", queue=f"q-none-{uuid.uuid4().hex[:8]}").job_id
    assert lifecycle.start(job_id, owner="lost-run") is not None
    request_cancel(job_id, CancellationReason.RESOURCE_LIMIT, "over its memory", CancellationSource.API)
    request = CancelRequest(CancellationReason.RESOURCE_LIMIT, "over its memory", CancellationSource.API)
    ends = [lifecycle.end_cancelled(job_id, request, at_item=0, by="finalizer", actor=f"reaper:{name}",
                                    observed_source=CancellationSource.WORKER_LOST) for name in ("a", "b")]
    assert ends == [True, False]
    assert kinds(job_id).count("cancel_observed") == 1
    assert_one_terminal(job_id)
