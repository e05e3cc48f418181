"""The same jobs on PostgreSQL, with concurrent workers: one terminal state each, exact counters."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from db.migrate import upgrade
from db.models import Job, JobItem
from db.session import session_scope
from db.settings import get_settings
from tasks.errors import JobAlreadyTerminal
from tests.jobs_helpers import assert_one_terminal, submit, wait_items, wait_terminal

pytestmark = pytest.mark.postgres


@pytest.fixture
def on_postgres(postgres_server, monkeypatch):
    url = postgres_server.create_database("andon_jobs")
    upgrade(url)
    monkeypatch.setenv("ANDON_DATABASE_URL", url)
    get_settings.cache_clear()
    yield url
    monkeypatch.undo()
    get_settings.cache_clear()


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
