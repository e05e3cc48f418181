"""The same jobs on PostgreSQL, with concurrent workers: one terminal state each, exact counters."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from db.models import Job, JobItem
from db.session import session_scope
from tasks.errors import JobAlreadyTerminal
from tests.jobs_helpers import assert_one_terminal, submit, wait_items, wait_terminal

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
