"""The same jobs on PostgreSQL, with concurrent workers: one terminal state each, exact counters."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from db.models import Job, JobItem
from db.session import session_scope
from tasks.errors import JobAlreadyTerminal
from tests.jobs_helpers import assert_one_terminal, statements_sent, submit, wait_items, wait_terminal

pytestmark = pytest.mark.postgres


@pytest.fixture
def on_postgres(postgres_database):
    return postgres_database


def test_jobs_on_postgres_with_two_workers(on_postgres, start_worker):
    from api import service

    first = start_worker(concurrency=2, ANDON_DATABASE_URL=on_postgres)
    second = start_worker(concurrency=2, queue=None, ANDON_DATABASE_URL=on_postgres)
    queues = [first.queue, second.queue]

    # a cancel mid-way keeps the finished items
    long_job = submit(40, stage_delay_s=0.02, queue=queues[0])
    wait_items(long_job, 3)
    service.cancel_job(long_job)
    job = wait_terminal(long_job)
    assert job.status == "cancelled" and 3 <= job.completed_items < 40

    # cancels racing completion across both workers: exactly one terminal state each
    racing = [submit(2, queue=queues[i % 2]) for i in range(40)]
    for job_id in racing:
        try:
            service.cancel_job(job_id)
        except JobAlreadyTerminal:
            pass
    for job_id in racing + [long_job]:
        wait_terminal(job_id)
        row = assert_one_terminal(job_id)
        with session_scope() as session:
            done = session.scalar(select(func.count()).select_from(JobItem).where(
                JobItem.job_id == job_id, JobItem.status == "done"))
        assert row.completed_items == done
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 41


def _kill_backends(server, url: str) -> None:
    """What a server restart does to pooled connections: every backend of the database is gone."""
    with server._connect() as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE datname = %s AND pid <> pg_backend_pid()", [url.rsplit("/", 1)[-1]])


def test_pooled_connections_the_server_dropped_are_replaced(on_postgres, postgres_server):
    """No ping on every checkout (a round trip each): a connection idle past PING_AFTER_IDLE_S is
    pinged and replaced if dead; one back in use sooner fails as a disconnect, the pool is
    invalidated, and a retried write goes through on a fresh connection."""
    import time

    from sqlalchemy import text

    from db.session import PING_AFTER_IDLE_S, make_engine, retry_transient
    from tasks import notify

    notify.install()  # as in every worker and API process: its rollback hook must not mask the disconnect
    engine = make_engine(on_postgres)

    def read() -> int:
        with engine.connect() as conn:
            return conn.scalar(text("SELECT 1"))

    try:
        assert read() == 1
        _kill_backends(postgres_server, on_postgres)
        time.sleep(PING_AFTER_IDLE_S + 0.2)
        assert read() == 1  # the idle connection was pinged and replaced, no error
        _kill_backends(postgres_server, on_postgres)
        assert retry_transient(read, within_s=10, what="test read") == 1  # at once: a disconnect, retried
        assert read() == 1
    finally:
        engine.dispose()


def test_a_run_writes_its_start_items_and_end_in_one_statement_each_and_announces_them(on_postgres, monkeypatch):
    """On PostgreSQL a job's start (its row and ``started`` event), each item write (the fenced
    counter and the items) and its ran-through end (row, event, last items) are one statement each,
    committed on its own — and each still wakes the streams: the notification hook sees the rows
    a data-modifying ``WITH`` inserts. A stale run's writes store nothing."""
    from datetime import UTC, datetime

    from db import jobs as job_rows
    from db.models import JobEvent
    from db.session import get_engine, transaction
    from db.settings import get_settings
    from db.vocabulary import ItemStatus, JobStatus
    from tasks import lifecycle, notify, webhooks

    notify.install()
    handed: list[tuple[str, str]] = []
    monkeypatch.setattr(notify, "notify_soon", lambda job_id, kind: handed.append((job_id, kind)))
    engine = get_engine()
    job_id = "one-statement-" + "ab12cd34"
    began, ended = datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC), datetime(2026, 1, 2, 3, 4, 6, tzinfo=UTC)
    with session_scope() as session:
        job_rows.create_job(session, job_id, ["a", "b", "c", "d"], {}, callback_url="https://example.com/hook")
    handed.clear()
    monkeypatch.setenv("ANDON_WEBHOOK_SECRET", "s" * 32)
    get_settings.cache_clear()
    webhooks_sent: list[tuple[str, str]] = []
    monkeypatch.setattr(webhooks, "send", lambda job, name, *_args, **_kw: webhooks_sent.append((job, name)))
    try:
        with statements_sent(engine) as sent:
            job = lifecycle.start(job_id, "this run", pipelines=["documents"])
            assert job is not None and job.status == "running" and job.fence == 1 and job.owner == "this run"
            assert len(sent) == 1 and handed == [(job_id, "event")]
            assert lifecycle.start(job_id, "another run") is None  # started once

            sent.clear(), handed.clear()
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                job_rows.record_items(conn, job_id, [job_rows.ItemRow(0, "s", ItemStatus.DONE, result={"ok": 0},
                                                                      started_at=began, finished_at=ended),
                                                     job_rows.ItemRow(1, "s", ItemStatus.FAILED, error="bad")], fence=1)
                conn.commit()
            assert len(sent) == 1 and handed == [(job_id, "item")]

            with pytest.raises(job_rows.NotOwner), transaction() as conn:  # a stale run: its batch is refused whole
                job_rows.record_items(conn, job_id, [job_rows.ItemRow(2, "s", ItemStatus.DONE)], fence=0)
            with pytest.raises(job_rows.NotOwner):
                lifecycle.finish_ran_through(job_id, 0, counts=(4, 2), items=[job_rows.ItemRow(2, "s", ItemStatus.DONE)])

            sent.clear(), handed.clear()
            last = [job_rows.ItemRow(2, "s", ItemStatus.DONE, result={"ok": [2]}), job_rows.ItemRow(3, "s", ItemStatus.DONE)]
            assert lifecycle.finish_ran_through(job_id, 1, counts=(4, 3), items=last).status is JobStatus.COMPLETED
            # the end is one statement; then, committed, the webhook reads whether the job has a callback
            assert len(sent) == 2 and "callback_url" in sent[1][0] and handed == [(job_id, "item")]
            assert webhooks_sent == [(job_id, "job.completed")]  # after the commit, once
    finally:
        get_settings.cache_clear()
    with session_scope() as session:
        row = session.get(Job, job_id)
        assert (row.status, row.completed_items, row.failed_items) == ("completed", 3, 1)
        stored = session.execute(select(JobItem.index, JobItem.status, JobItem.result, JobItem.error)
                                 .where(JobItem.job_id == job_id).order_by(JobItem.index)).all()
        assert [tuple(r) for r in stored] == [(0, "done", {"ok": 0}, None), (1, "failed", None, "bad"),
                                              (2, "done", {"ok": [2]}, None), (3, "done", None, None)]
        assert session.execute(select(JobItem.started_at, JobItem.finished_at)
                               .where(JobItem.job_id == job_id, JobItem.index == 0)).one() == (began, ended)
        kinds = session.scalars(select(JobEvent.kind).where(JobEvent.job_id == job_id).order_by(JobEvent.id)).all()
        assert kinds == ["submitted", "started", "completed"]
    assert_one_terminal(job_id)


def test_a_batch_stores_every_value_and_announces_every_job(on_postgres):
    """A batch's jobs, tags and events go in as one statement on PostgreSQL (the jobs and tags in a
    data-modifying ``WITH``), each table's rows read from one JSON parameter: every value as the ORM
    would store it — JSON documents and options, times, NULLs, booleans — and each job's
    ``submitted`` event still seen by the notification hook, so the submit can publish it with the
    job's message. A batch without tags, and a single job, are one statement too."""
    from db import jobs as job_rows
    from db.models import JobEvent, JobTag
    from db.session import get_engine
    from tasks import notify

    notify.install()
    with statements_sent(get_engine()) as sent, session_scope() as session:
        job_rows.create_jobs(session, [{"id": "alone", "inputs": ["x"], "options": {}, "pipeline": "documents"}])
        assert len(sent) == 1 and sent[0][0].lstrip().startswith("WITH new_jobs AS"), sent
        assert notify.claim(session.connection(), ["alone"]) == {"alone"}
        session.rollback()

    specs = [{"id": f"batch-{i:02d}", "inputs": [{"text": f"doc {i}", "n": i}, "é\u2603"], "options": {"stage_delay_s": 0.5},
              "pipeline": "documents", "tags": ["b", "a", "b"] if i % 2 else [], "deadline_s": 1.5 if i == 1 else None,
              "deferred": i == 2, "tenant": "acme" if i == 3 else None} for i in range(5)]
    with statements_sent(get_engine()) as sent, session_scope() as session:
        job_rows.create_jobs(session, specs, actor="tester")
        claimed = notify.claim(session.connection(), [spec["id"] for spec in specs])
    assert len(sent) == 1 and "new_job_tags AS" in sent[0][0], sent
    assert claimed == {spec["id"] for spec in specs}
    with session_scope() as session:
        jobs = {job.id: job for job in session.scalars(select(Job).where(Job.id.like("batch-%")))}
        for i, spec in enumerate(specs):
            job = jobs[spec["id"]]
            assert (job.status, job.inputs, job.options, job.total_items, job.deadline_s, job.deferred, job.tenant,
                    job.resumable, job.fence, job.cancellation_reason) == (
                "pending", spec["inputs"], spec["options"], 2, spec["deadline_s"], i == 2, spec["tenant"], False, 0, None)
            assert job.created_at.tzinfo is not None and job.created_at == jobs["batch-00"].created_at
        tags = session.execute(select(JobTag.job_id, JobTag.tag, JobTag.created_at).order_by(JobTag.job_id, JobTag.tag)).all()
        assert [(t.job_id, t.tag) for t in tags] == [("batch-01", "a"), ("batch-01", "b"), ("batch-03", "a"),
                                                      ("batch-03", "b")]
        assert all(t.created_at == jobs["batch-00"].created_at for t in tags)
        events = session.execute(select(JobEvent.job_id, JobEvent.kind, JobEvent.actor, JobEvent.detail)
                                 .order_by(JobEvent.id)).all()
        assert [tuple(e) for e in events] == [(spec["id"], "submitted", "tester", {"items": 2, "pipeline": "documents"})
                                              for spec in specs]
