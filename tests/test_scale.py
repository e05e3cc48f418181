"""At scale: batch submit (all or nothing, in order), retention (prune), and the benchmark's quick mode."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from db import jobs as job_rows
from db.models import Job, JobEvent, JobItem, JobParent, JobTag, utcnow
from db.session import session_scope
from db.vocabulary import ItemStatus, JobStatus
from tests.jobs_helpers import wait_terminal

ROOT = Path(__file__).resolve().parent.parent
ANDON = str(Path(sys.executable).parent / "andon")


def _jobs_made() -> int:
    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(Job))


def test_batch_submit_returns_the_ids_in_order_and_every_job_runs(api_client):
    bodies = [{"items": [f"Doc {i}. Some text."] * (i + 1), "tags": [f"batch-{i % 2}"]} for i in range(5)]
    answer = api_client.post("/api/jobs/batch", json={"jobs": bodies})
    assert answer.status_code == 202, answer.text
    job_ids = answer.json()["job_ids"]
    assert len(job_ids) == 5 and len(set(job_ids)) == 5
    for i, job_id in enumerate(job_ids):
        wait_terminal(job_id)
        job = api_client.get(f"/api/jobs/{job_id}").json()
        assert job["status"] == "completed" and job["total_items"] == i + 1 and job["tags"] == [f"batch-{i % 2}"]
    with session_scope() as session:
        submitted = session.scalars(select(JobEvent.job_id).where(JobEvent.job_id.in_(job_ids),
                                                                  JobEvent.kind == "submitted")).all()
    assert sorted(submitted) == sorted(job_ids)


def test_batch_submit_is_all_or_nothing_and_names_the_index(api_client):
    before = _jobs_made()
    good = {"documents": ["fine"]}
    # the request model rejects the fourth body: FastAPI's own 422 names it
    answer = api_client.post("/api/jobs/batch", json={"jobs": [good, good, good, {"documents": [""], "nope": 1}]})
    assert answer.status_code == 422
    assert any(e["loc"][:3] == ["body", "jobs", 3] for e in answer.json()["detail"]), answer.text
    # a pipeline's item model rejects item 0 of the fourth body: the service's 422 names it the same way
    bad_item = {"pipeline": "user-tickets", "items": [{"title": "t", "priority": 9}]}
    answer = api_client.post("/api/jobs/batch", json={"jobs": [good, good, good, bad_item]})
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"][0]["loc"][:5] == ["body", "jobs", 3, "items", 0]
    # an unknown pipeline, an unknown parent: the same
    answer = api_client.post("/api/jobs/batch", json={"jobs": [good, {"pipeline": "nope", "items": [1]}]})
    assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == ["body", "jobs", 1]
    answer = api_client.post("/api/jobs/batch", json={"jobs": [good, {**good, "parent_job_id": str(uuid.uuid4())}]})
    assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == ["body", "jobs", 1, "parent_job_id"]
    assert _jobs_made() == before  # nothing was made


def test_batch_submit_is_bounded(api_client):
    assert api_client.post("/api/jobs/batch", json={"jobs": []}).status_code == 422
    answer = api_client.post("/api/jobs/batch", json={"jobs": [{"documents": ["a"]}] * 10_001})
    assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == ["body", "jobs"]


def _old_job(session, status: JobStatus, ended_days_ago: float | None, **extra) -> str:
    job_id = str(uuid.uuid4())
    job_rows.create_job(session, job_id, ["a", "b"], {}, tags=["old"], **extra)
    values = {"status": status.value}
    if ended_days_ago is not None:
        values["finished_at"] = utcnow() - timedelta(days=ended_days_ago)
    session.query(Job).filter(Job.id == job_id).update(values)
    session.add(JobItem(job_id=job_id, index=0, stage="parse", status=ItemStatus.DONE.value, result={"x": 1}))
    job_rows.add_event(session, job_id, job_rows.EventKind.STARTED)
    return job_id


def test_prune_deletes_only_finished_jobs_older_than_the_cutoff_with_their_rows(db_url):
    from api.service import prune_jobs

    with session_scope(db_url) as session:
        old = [_old_job(session, status, 40) for status in (JobStatus.COMPLETED, JobStatus.CANCELLED, JobStatus.FAILED)]
        recent = _old_job(session, JobStatus.COMPLETED, 5)
        running = _old_job(session, JobStatus.RUNNING, None)
        stale_pending = _old_job(session, JobStatus.PENDING, None)
        # jobs pointing at an old one keep their rows and forget it
        resumed = _old_job(session, JobStatus.RUNNING, None, resumed_from=old[1])
        child = _old_job(session, JobStatus.PENDING, None, parent_job_id=old[0])
        session.add(JobParent(job_id=child, parent_id=old[2]))
    with session_scope(db_url) as session:  # make the unfinished ones old too: age alone never prunes
        session.query(Job).filter(Job.finished_at.is_(None)).update(
            {"created_at": utcnow() - timedelta(days=400)}, synchronize_session=False)

    assert prune_jobs(30 * 86400, batch=2, url=db_url) == 3
    with session_scope(db_url) as session:
        left = set(session.scalars(select(Job.id)))
        assert left == {recent, running, stale_pending, resumed, child}
        for model in (JobItem, JobEvent, JobTag):
            assert not session.scalars(select(model).where(model.job_id.in_(old))).all(), model
        assert not session.scalars(select(JobParent)).all()
        assert session.get(Job, resumed).resumed_from is None and session.get(Job, child).parent_job_id is None
    assert prune_jobs(30 * 86400, url=db_url) == 0


def test_admin_prune_route_needs_the_admin_token_with_tenants(api_client, monkeypatch):
    from db.settings import get_settings

    assert api_client.post("/api/admin/prune", json={"older_than_s": 3650 * 86400}).json() == {"deleted": 0}
    assert api_client.post("/api/admin/prune", json={"older_than_s": -1}).status_code == 422
    monkeypatch.setenv("ANDON_API_TOKENS", json.dumps({"acme": "acme-token"}))
    monkeypatch.setenv("ANDON_ADMIN_TOKEN", "admin-token")
    get_settings.cache_clear()
    try:
        body = {"older_than_s": 3650 * 86400}
        assert api_client.post("/api/admin/prune", json=body).status_code == 401
        tenant = api_client.post("/api/admin/prune", json=body, headers={"Authorization": "Bearer acme-token"})
        assert tenant.status_code == 403
        admin = api_client.post("/api/admin/prune", json=body, headers={"Authorization": "Bearer admin-token"})
        assert admin.status_code == 200 and admin.json() == {"deleted": 0}
    finally:
        monkeypatch.delenv("ANDON_API_TOKENS")
        monkeypatch.delenv("ANDON_ADMIN_TOKEN")
        get_settings.cache_clear()


@pytest.mark.parametrize("duration", ["soon", "30x", "-3d", "d", "1e400d"])
def test_cli_prune_refuses_a_bad_duration_in_one_line(database, duration):
    answer = subprocess.run([ANDON, "prune", "--older-than", duration], capture_output=True, text=True, timeout=60)
    assert answer.returncode == 2
    assert answer.stderr.count("\n") == 1 and "Traceback" not in answer.stderr
    assert "--older-than" in answer.stderr and "30d" in answer.stderr


def test_cli_prune_deletes_old_finished_jobs(database):
    with session_scope() as session:
        old = _old_job(session, JobStatus.COMPLETED, 400)
    answer = subprocess.run([ANDON, "prune", "--older-than", "365d", "--json"], capture_output=True, text=True,
                            timeout=60)
    assert answer.returncode == 0, answer.stderr
    assert json.loads(answer.stdout)["deleted"] >= 1
    with session_scope() as session:
        assert session.get(Job, old) is None


@pytest.mark.timeout(900)  # both database columns, on a box the rest of the suite keeps busy
def test_quick_bench_runs_and_writes_valid_results_json(tmp_path):
    """The benchmark's figures are not timed tests: this only checks the quick mode runs to the end and
    writes results.json in the shape DESIGN.md gives, with a column per database where PostgreSQL can
    start here."""
    from tests.pgserver import postgres_available
    from tests.test_bench import check_results_shape

    out = tmp_path / "results.json"
    answer = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--no-readme",
                             "--results", str(out)], capture_output=True, text=True, timeout=840, cwd=ROOT)
    assert answer.returncode == 0, answer.stdout[-3000:] + answer.stderr[-3000:]
    results = json.loads(out.read_text())
    check_results_shape(results)
    names = " ".join(f["name"] for f in results["figures"])
    assert "batch submit" in names and "GET /api/jobs" in names and "/metrics" in names
    assert "dramatiq-abort" in names  # the peer baseline
    expected = {"sqlite", "postgres"} if postgres_available() is None else {"sqlite"}
    assert {f["database"] for f in results["figures"]} >= expected


@pytest.mark.postgres
def test_metrics_scrape_starts_no_parallel_workers_on_postgres(postgres_server, monkeypatch):
    """A scrape counts the unfinished jobs every time: over 20,000 of them PostgreSQL's planner takes
    a parallel plan, two worker processes started per statement, more time than the scan itself
    (and far more on a busy box). Every statement of a scrape must plan without them."""
    from sqlalchemy import event, text

    from api import metrics
    from db.migrate import upgrade
    from db.session import get_engine

    url = postgres_server.create_database(f"andon_{uuid.uuid4().hex[:12]}")
    upgrade(url)
    ids = sorted(str(uuid.uuid4()) for _ in range(50_000))
    with session_scope(url) as session:  # 20,000 unfinished, 30,000 ended in the last minute
        job_rows.create_jobs(session, [{"id": job_id, "inputs": ["x"], "options": {}, "pipeline": "documents"}
                                       for job_id in ids])
        session.execute(update(Job).where(Job.id <= ids[29_999]).values(
            status="cancelled", cancellation_reason="timeout", finished_at=utcnow()))
    engine = get_engine(url)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM (ANALYZE) jobs")

    def gathers(plan: dict) -> int:
        return (plan.get("Node Type", "").startswith("Gather")
                + sum(gathers(child) for child in plan.get("Plans", [])))

    plans: list[tuple[str, dict]] = []

    def explain(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith(("SELECT", "WITH")) and "count(" in statement:
            plan = conn.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {statement}", parameters).scalar()
            plans.append((statement, plan[0]["Plan"]))

    monkeypatch.setattr(metrics, "session_scope", lambda: session_scope(url))
    event.listen(engine, "before_cursor_execute", explain)
    try:
        metrics.JobMetrics()._read()
        counted = len(plans)
        with session_scope(url) as session:  # the premise: without the setting, the planner takes workers
            session.execute(metrics._unsettled_counts(utcnow() - timedelta(minutes=1), utcnow()))
    finally:
        event.remove(engine, "before_cursor_execute", explain)
    assert counted >= 2 and gathers(plans[-1][1]), plans[-1]
    assert not any(gathers(plan) for _, plan in plans[:counted]), plans[:counted]
    with session_scope(url) as session:
        assert session.execute(text("SHOW max_parallel_workers_per_gather")).scalar() != "0"
