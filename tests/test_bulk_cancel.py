"""Bulk cancel: thousands of queued jobs in one pass, none of which starts afterwards."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from api import service
from db.models import Job, JobEvent
from db.session import session_scope
from db.vocabulary import CancellationReason, EventKind, JobStatus
from tests.jobs_helpers import submit, wait_status, wait_terminal
from tests.procs import wait_for


def test_bulk_cancel_of_queued_jobs_leaves_none_to_start(start_worker):
    w = start_worker(concurrency=1)
    blocker = submit(500, stage_delay_s=0.05, queue=w.queue)
    wait_status(blocker, "running")
    queued = [submit(1, queue=w.queue) for _ in range(300)]
    outcome = service.cancel_matching(JobStatus.PENDING, reason=CancellationReason.TIMEOUT)
    assert outcome.cancelled >= 300 and outcome.cancelling == 0
    service.cancel_job(blocker)
    wait_terminal(blocker)
    # the worker now drains the queue: every one of them must be skipped
    wait_for(lambda: _count(JobEvent.kind == "started", queued) == 0 and _drained(w), 60, interval=0.2,
             what="the worker to drain the cancelled jobs")
    with session_scope() as session:
        statuses = set(session.scalars(select(Job.status).where(Job.id.in_(queued))))
        requested = session.scalar(select(func.count()).select_from(JobEvent).where(
            JobEvent.job_id.in_(queued), JobEvent.kind == "cancel_requested"))
        resumable = set(session.scalars(select(Job.resumable).where(Job.id.in_(queued))))
    assert statuses == {"cancelled"} and requested == 300
    assert resumable == {True}  # cancelled for `timeout` while queued: still worth resuming
    assert _count(JobEvent.kind == "started", queued) == 0


def _count(condition, job_ids) -> int:
    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(JobEvent).where(condition, JobEvent.job_id.in_(job_ids)))


def _drained(worker) -> bool:
    from tasks.process import get_redis

    return get_redis().llen(worker.queue) == 0


def test_bulk_cancel_over_http_by_parent_and_status(api_client):
    parent = submit(200, stage_delay_s=0.05)
    children = [submit(1, parent_job_id=parent) for _ in range(5)]
    answer = api_client.post("/api/jobs/cancel", json={"parent_job_id": parent, "reason": "timeout"})
    assert answer.status_code == 202 and answer.json() == {"matched": 5, "cancelled": 5, "cancelling": 0}
    for child in children:
        job = wait_terminal(child)
        assert job.cancellation_reason == "timeout" and job.started_at is None
    assert api_client.post("/api/jobs/cancel", json={}).status_code == 422
    assert api_client.post("/api/jobs/cancel", json={"status": "completed"}).status_code == 422
    wait_status(parent, "running")
    running = api_client.post("/api/jobs/cancel", json={"status": "running"}).json()
    assert running["cancelling"] >= 1
    wait_terminal(parent)


def test_tags_find_and_bulk_cancel_a_batch_over_http_and_the_cli(api_client, api_server, monkeypatch):
    from tests.test_cli import andon

    monkeypatch.setenv("ANDON_API_URL", api_server)  # the CLI's job verbs speak HTTP

    batch_a = [api_client.post("/api/jobs", json={"documents": ["One. Two."] * 100, "tags": ["batch-a", "nightly"],
                                                  "options": {"stage_delay_s": 0.05}}).json()["job_id"]
               for _ in range(3)]
    batch_b = [submit(100, stage_delay_s=0.05, tags=["batch-b"]) for _ in range(2)]
    other = submit(100, stage_delay_s=0.05)

    listed = api_client.get("/api/jobs", params={"tag": "batch-a", "limit": 1000}).json()
    assert sorted(j["job_id"] for j in listed) == sorted(batch_a)
    assert all(j["tags"] == ["batch-a", "nightly"] for j in listed)

    answer = api_client.post("/api/jobs/cancel", json={"tag": "batch-a", "message": "bad batch"})
    assert answer.status_code == 202 and answer.json()["matched"] == 3
    cancelled = andon("cancel", "--all", "--tag", "batch-b")
    assert cancelled.returncode == 0 and "2 matched" in cancelled.stdout, cancelled.stderr
    for job_id in batch_a + batch_b:
        assert wait_terminal(job_id).status == "cancelled"
    assert api_client.get(f"/api/jobs/{other}").json()["status"] in ("pending", "running")
    service.cancel_job(other)

    # a bad tag is a clear 422 / one-line CLI message, and nothing is made
    bad = api_client.post("/api/jobs", json={"documents": ["x"], "tags": ["no spaces"]})
    assert bad.status_code == 422 and "tags" in bad.text
    assert api_client.get("/api/jobs", params={"tag": "no spaces"}).status_code == 422
    refused = andon("submit", "--tag", "no spaces", "some text")
    assert refused.returncode != 0 and refused.stdout == ""
    assert refused.stderr.strip().count("\n") == 0 and "invalid tag 'no spaces'" in refused.stderr
    wait_terminal(other)


def test_bulk_cancel_answers_202_when_redis_fails_after_the_rows_commit(api_client, monkeypatch, caplog):
    """The rows are the durable copy of each cancel: with the API's Redis unreachable, the request
    still finishes the database side and answers the counts; the running job's worker reads its
    cancel from the row (reconcile) and stops."""
    import uuid

    import redis

    from api.supervisor import free_port
    from tasks import control
    from tasks.cancellation import CancellationStore

    tag = f"redis-down-{uuid.uuid4().hex[:8]}"
    parent = submit(200, stage_delay_s=0.05, tags=[tag])
    children = [submit(1, parent_job_id=parent, tags=[tag]) for _ in range(3)]  # queued behind it
    wait_status(parent, "running")
    dead = redis.Redis(port=free_port(), socket_connect_timeout=1, socket_timeout=1)
    monkeypatch.setattr(control, "get_store", lambda: CancellationStore(dead))
    with caplog.at_level("WARNING", logger="tasks.control"):
        answer = api_client.post("/api/jobs/cancel", json={"tag": tag, "message": "Redis is away"})
    assert answer.status_code == 202, answer.text
    assert answer.json() == {"matched": 4, "cancelled": 3, "cancelling": 1}
    assert "recorded in the database only" in caplog.text
    for child in children:
        job = wait_terminal(child)
        assert job.status == "cancelled" and job.cancellation_message == "Redis is away" and job.started_at is None
    job = wait_terminal(parent)
    assert job.status == "cancelled" and job.cancellation_message == "Redis is away"


def test_cancel_many_writes_each_token_as_a_single_cancel_would_and_the_first_cancel_still_wins(store):
    """The token as a single cancel writes it; the request log is left alone (each job's
    ``cancel_requested`` event holds the bulk request)."""
    import json
    import uuid

    from db.vocabulary import CancellationSource
    from tasks.cancellation import CancelRequest
    from tasks.cancellation.keys import cancel_key, cancel_requests_key
    from tasks.cancellation.store import CANCEL_MANY_CHUNK

    redis = store.redis
    ids = [str(uuid.uuid4()) for _ in range(CANCEL_MANY_CHUNK + 7)] + ['odd "id" \\ é']
    earlier = ids[3]
    store.cancel(earlier, CancellationReason.TIMEOUT, "first", CancellationSource.DEADLINE)
    store.cancel_many(ids, CancellationReason.USER_REQUESTED, 'bulk "quoted"', CancellationSource.API)
    for job_id in (ids[0], ids[CANCEL_MANY_CHUNK], ids[-1]):
        raw = redis.get(cancel_key(job_id))
        token = json.loads(raw)
        assert token["job_id"] == job_id and token["reason"] == "user_requested" and token["message"] == 'bulk "quoted"'
        request = CancelRequest.from_json(token)
        assert (raw.decode() if isinstance(raw, bytes) else raw) == json.dumps(request.to_json(job_id))
        assert 0 < redis.ttl(cancel_key(job_id)) <= store.ttl_s and not redis.exists(cancel_requests_key(job_id))
    assert store.read([earlier])[earlier].reason is CancellationReason.TIMEOUT  # SET NX: the first cancel wins
    assert [json.loads(r)["reason"] for r in redis.lrange(cancel_requests_key(earlier), 0, -1)] == ["timeout"]


def test_one_bulk_update_keeps_each_pipelines_resumable_policy(database):
    import uuid

    from db import jobs as job_rows
    from tasks import lifecycle
    from tasks.cancellation import CancelRequest
    from tasks.policy import resumable

    pipelines = ["documents", "user-requeue", "documents", "user-requeue", "not-registered"]
    ids = [str(uuid.uuid4()) for _ in pipelines]
    with session_scope() as session:
        job_rows.create_jobs(session, [{"id": job_id, "inputs": ["x"], "options": {}, "pipeline": pipeline}
                                       for job_id, pipeline in zip(ids, pipelines)])
    request = CancelRequest(CancellationReason.RESOURCE_LIMIT, "too big", None)
    with session_scope() as session:
        assert sorted(lifecycle.cancel_queued(session, ids, request)) == sorted(ids)
    with session_scope() as session:
        rows = {job.id: job for job in session.scalars(select(Job).where(Job.id.in_(ids)))}
    assert [rows[job_id].resumable for job_id in ids] == \
        [resumable(pipeline, CancellationReason.RESOURCE_LIMIT) for pipeline in pipelines] == \
        [False, True, False, True, False]
    assert {rows[job_id].status for job_id in ids} == {"cancelled"}
    assert {rows[job_id].cancellation_reason for job_id in ids} == {"resource_limit"}
    with session_scope() as session:  # a second pass changes nothing: only pending rows move
        assert lifecycle.cancel_queued(session, ids, request) == []


def test_bulk_cancel_resumes_only_the_jobs_whose_policy_resumes_them(database):
    import uuid

    from tasks.process import get_redis

    queue, tag = f"q-none-{uuid.uuid4().hex[:8]}", f"policy-{uuid.uuid4().hex[:8]}"  # no worker: they stay queued
    auto = [service.submit_job(["a", "b"], pipeline="user-autoresume", queue=queue, tags=[tag]).job_id for _ in range(3)]
    plain = [service.submit_job(["One."], queue=queue, tags=[tag]).job_id for _ in range(2)]
    try:
        outcome = service.cancel_matching(JobStatus.PENDING, tag=tag, reason=CancellationReason.TIMEOUT)
        assert outcome.cancelled == 5
        with session_scope() as session:
            jobs = {job.id: job for job in session.scalars(select(Job).where(Job.id.in_(auto + plain)))}
        assert all(jobs[job_id].resumed_by for job_id in auto)  # timeout → auto_resume for this pipeline
        assert not any(jobs[job_id].resumed_by for job_id in plain)  # the documents pipeline: resumable only
        assert all(jobs[job_id].status == "cancelled" and jobs[job_id].resumable for job_id in auto + plain)
    finally:
        get_redis().delete(queue)


def test_bulk_cancel_rows_and_events_on_each_database(db_url):
    """The set-based half of a bulk cancel on SQLite and PostgreSQL: the id list goes as one parameter
    (``json_each`` / ``= ANY``), only rows still pending move, and each ended job gets its two events,
    in order, with the request's fields — odd ids included."""
    import uuid

    from db import jobs as job_rows
    from db.vocabulary import CancellationSource, EventKind
    from tasks import lifecycle
    from tasks.cancellation import CancelRequest

    ids = sorted(str(uuid.uuid4()) for _ in range(5)) + ['odd "id" \\ é']
    running, unknown = ids[1], str(uuid.uuid4())
    with session_scope(db_url) as session:
        job_rows.create_jobs(session, [{"id": job_id, "inputs": ["x"], "options": {}, "pipeline": "documents"}
                                       for job_id in ids])
        job_rows.transition(session, running, JobStatus.RUNNING)
    request = CancelRequest(CancellationReason.TIMEOUT, "bulk", CancellationSource.API)
    detail = {"message": "bulk", "bulk": True}
    with session_scope(db_url) as session:
        job_rows.by_index(session)
        ended = lifecycle.cancel_queued(session, ids + [unknown], request, {"documents"}, actor="me", detail=detail,
                                        events=(EventKind.CANCEL_REQUESTED, EventKind.CANCELLED))
    assert sorted(ended) == sorted(set(ids) - {running})
    with session_scope(db_url) as session:
        statuses = dict(session.execute(select(Job.id, Job.status).where(Job.id.in_(ids))).all())
        events = session.execute(select(JobEvent.job_id, JobEvent.kind, JobEvent.reason, JobEvent.source,
                                        JobEvent.actor, JobEvent.detail, JobEvent.at)
                                 .where(JobEvent.job_id.in_(ids), JobEvent.kind != "submitted")
                                 .order_by(JobEvent.id)).all()
    assert statuses == {job_id: "running" if job_id == running else "cancelled" for job_id in ids}
    assert [(e.job_id, e.kind) for e in events] == [
        (job_id, kind) for job_id in sorted(ended) for kind in ("cancel_requested", "cancelled")]
    assert {(e.reason, e.source, e.actor) for e in events} == {("timeout", "api", "me")}
    assert all(e.detail == detail and e.at == request.at for e in events)
    with session_scope(db_url) as session:  # a second pass moves nothing, and adds no event for nothing
        assert lifecycle.cancel_queued(session, ids, request, events=(EventKind.CANCELLED,)) == []
        job_rows.add_events_for(session, [], (EventKind.CANCELLED,))
    with session_scope(db_url) as session:
        assert session.scalar(select(func.count()).select_from(JobEvent).where(
            JobEvent.job_id.in_(ids), JobEvent.kind != "submitted")) == len(events)


def test_bulk_cancel_looks_its_ids_up_by_id_on_sqlite(tmp_path):
    """SQLite without statistics takes ``status = 'pending'`` to select ten rows: the bulk UPDATE
    walked every pending job's entry in a status index for each thousand ids (a 100,000-job cancel
    went quadratic). Its plan must look the ids up by the primary key."""
    import uuid

    from db import jobs as job_rows
    from db.migrate import upgrade
    from db.session import get_engine
    from tasks import lifecycle
    from tasks.cancellation import CancelRequest
    from tests.jobs_helpers import statements_sent

    url = f"sqlite:///{tmp_path / 'plan.db'}"
    upgrade(url)
    ids = [str(uuid.uuid4()) for _ in range(3)]
    with session_scope(url) as session:
        job_rows.create_jobs(session, [{"id": job_id, "inputs": ["x"], "options": {}, "pipeline": "documents"}
                                       for job_id in ids])
    with statements_sent(get_engine(url)) as sent, session_scope(url) as session:
        ended = lifecycle.cancel_queued(session, ids, CancelRequest(CancellationReason.TIMEOUT), {"documents"},
                                        events=(EventKind.CANCELLED,))
    seen = [(statement, parameters) for statement, parameters in sent
            if statement.lstrip().upper().startswith(("UPDATE", "INSERT"))]
    assert sorted(ended) == sorted(ids) and len(seen) == 2
    with get_engine(url).connect() as conn:
        (update_sql, update_params), (events_sql, events_params) = seen
        plan = " | ".join(row[-1] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {update_sql}", update_params))
        assert "SEARCH jobs USING" in plan and "(id=?)" in plan and "status=?" not in plan, plan
        # the events come from the ids alone: no walk of jobs at all (their foreign key is checked by id)
        plan = " | ".join(row[-1] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {events_sql}", events_params))
        assert "jobs" not in plan, plan


@pytest.mark.postgres
def test_bulk_cancel_finds_its_jobs_by_id_on_postgres_whatever_the_statistics_say(postgres_server):
    """The statistics PostgreSQL plans from are of the table when it was last analyzed, and then
    most jobs were over: ``status = 'pending'`` looked like a handful of rows. A bulk cancel of the
    jobs queued since read every pending job through the status index for each thousand ids, and
    matched a tag by rescanning the whole tag for each pending job (12.9 s for 10,000). Its reads
    must find the jobs by their ids (the tag's, then the primary key), the status only checked."""
    import json
    import uuid

    from sqlalchemy import text, update

    from db import jobs as job_rows
    from db.migrate import upgrade
    from db.session import get_engine
    from tasks import control

    url = postgres_server.create_database(f"andon_{uuid.uuid4().hex[:12]}")
    upgrade(url)
    ended = [{"id": str(uuid.uuid4()), "inputs": ["x"], "options": {}, "pipeline": "documents"} for _ in range(3000)]
    fresh = [{"id": str(uuid.uuid4()), "inputs": ["x"], "options": {}, "pipeline": "documents", "tags": ["fresh"]}
             for _ in range(300)]
    with session_scope(url) as session:
        job_rows.create_jobs(session, ended)
        session.execute(update(Job).values(status="cancelled"))
    with get_engine(url).connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE"))  # the statistics: nothing pending
    with session_scope(url) as session:
        job_rows.create_jobs(session, fresh)

    def indexes(conn, statement) -> set[str]:
        sql = str(statement.compile(conn.engine, compile_kwargs={"literal_binds": True}))
        plan = conn.execute(text(f"EXPLAIN (FORMAT JSON) {sql}")).scalar()
        found, nodes = set(), [plan[0]["Plan"] if isinstance(plan, list) else json.loads(plan)[0]["Plan"]]
        while nodes:
            node = nodes.pop()
            assert "Join Filter" not in node, node  # no join that rescans one side for each row of the other
            found |= {node["Index Name"]} if "Index Name" in node else set()
            nodes += node.get("Plans", [])
        return found

    ids = [job["id"] for job in fresh]
    with get_engine(url).connect() as conn:
        used = indexes(conn, control.matching(conn, JobStatus.PENDING, None, "fresh", None))
        assert used and not any(name.startswith("ix_jobs_status") for name in used), used
    with session_scope(url) as session:
        job_rows.by_index(session)
        conn = session.connection()
        assert indexes(conn, select(Job.id).where(
            job_rows.ids_in(session, Job.id, ids, Job.status == JobStatus.PENDING.value))) == {"jobs_pkey"}

    # the batch itself: its UPDATE and its events are one statement, which finds the jobs by id alone
    from tasks import lifecycle
    from tasks.cancellation import CancelRequest
    from tests.jobs_helpers import statements_sent

    with statements_sent(get_engine(url)) as sent, session_scope(url) as session:
        job_rows.by_index(session)
        done = lifecycle.cancel_queued(session, ids, CancelRequest(CancellationReason.TIMEOUT), {"documents"},
                                       events=(EventKind.CANCEL_REQUESTED, EventKind.CANCELLED))
        (statement, parameters), = [(sql, params) for sql, params in sent if "UPDATE" in sql]
        plan = session.connection().exec_driver_sql(f"EXPLAIN (FORMAT JSON) {statement}", parameters).scalar()
    assert sorted(done) == sorted(ids)
    found, nodes = set(), [plan[0]["Plan"]]
    while nodes:
        node = nodes.pop()
        assert "Join Filter" not in node, node
        found |= {node["Index Name"]} if "Index Name" in node else set()
        nodes += node.get("Plans", [])
    assert found == {"jobs_pkey"}, found
    with session_scope(url) as session:
        assert session.scalar(select(func.count()).select_from(JobEvent).where(
            JobEvent.job_id.in_(ids), JobEvent.kind.in_(["cancel_requested", "cancelled"]))) == 2 * len(ids)


def test_bulk_batches_in_flight_are_bounded_in_order_and_stop_at_the_first_failure():
    """PostgreSQL's bulk cancel runs two batch transactions at once (``tasks.control._in_order``):
    results come back in the batches' order, never more than ``width`` run at once, and after a
    batch fails no further batch starts, while the one already running still finishes."""
    import threading
    import time

    import pytest

    from tasks.control import _in_order

    lock = threading.Lock()
    running, most, done = [0], [0], []

    def batch(chunk: list[str]) -> list[str]:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.02 if chunk[0] == "0" else 0.005)  # the first is slowest: order is not completion
        with lock:
            running[0] -= 1
            done.append(chunk[0])
        if chunk[0] == "fail":
            raise RuntimeError("batch failed")
        return chunk

    chunks = [[str(i)] for i in range(7)]
    assert list(_in_order(batch, chunks, 2)) == chunks and most[0] == 2
    assert list(_in_order(batch, chunks, 1)) == chunks

    done.clear()
    seen = []
    with pytest.raises(RuntimeError, match="batch failed"):
        for result in _in_order(batch, [["0"], ["fail"], ["2"], ["3"], ["4"]], 2):
            seen.append(result)
    assert seen == [["0"]] and "fail" in done and "4" not in done and running[0] == 0
