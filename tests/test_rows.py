"""Job rows on SQLite and PostgreSQL: migrations, the one place status changes, item counters."""

from __future__ import annotations

import threading
import uuid

import pytest
from sqlalchemy import inspect, select

from db import jobs as job_rows
from db.migrate import downgrade, upgrade
from db.models import Job, JobEvent
from db.session import get_engine, session_scope, transaction
from db.vocabulary import ItemStatus, JobStatus


def _new_job(url: str, status: JobStatus = JobStatus.PENDING) -> str:
    job_id = str(uuid.uuid4())
    with session_scope(url) as session:
        job_rows.create_job(session, job_id, ["a", "b"], {})
        if status is not JobStatus.PENDING:
            job_rows.transition(session, job_id, JobStatus.RUNNING)
    return job_id


def test_migrations_upgrade_and_downgrade(db_url):
    assert {"jobs", "job_items", "job_events", "job_tags"} <= set(inspect(get_engine(db_url)).get_table_names())
    downgrade(db_url)
    assert not {"jobs", "job_items", "job_events", "job_tags"} & set(inspect(get_engine(db_url)).get_table_names())
    upgrade(db_url)
    assert {"jobs", "job_items", "job_events", "job_tags"} <= set(inspect(get_engine(db_url)).get_table_names())


@pytest.mark.parametrize(
    ("start", "to", "allowed"),
    [
        (JobStatus.PENDING, JobStatus.RUNNING, True),
        (JobStatus.PENDING, JobStatus.COMPLETED, False),
        (JobStatus.PENDING, JobStatus.CANCELLED, True),
        (JobStatus.RUNNING, JobStatus.CANCELLING, True),
        (JobStatus.RUNNING, JobStatus.PENDING, True),  # requeued after its worker was lost
        (JobStatus.PENDING, JobStatus.CANCELLING, False),
    ],
)
def test_transition_rules(db_url, start, to, allowed):
    job_id = _new_job(db_url, start)
    with session_scope(db_url) as session:
        assert job_rows.transition(session, job_id, to) is allowed


@pytest.mark.parametrize("terminal", [JobStatus.CANCELLED, JobStatus.COMPLETED, JobStatus.FAILED])
def test_a_terminal_status_is_never_left(db_url, terminal):
    job_id = _new_job(db_url, JobStatus.RUNNING)
    with session_scope(db_url) as session:
        assert job_rows.transition(session, job_id, terminal)
    for other in job_rows.ALLOWED_FROM:
        with session_scope(db_url) as session:
            assert job_rows.transition(session, job_id, other) is False
    with session_scope(db_url) as session:
        job = session.get(Job, job_id)
        kinds = [e.kind for e in session.scalars(select(JobEvent).where(JobEvent.job_id == job_id))]
    assert job.status == terminal and job.finished_at is not None
    assert kinds.count(terminal.value) == 1


def test_cancel_racing_completion_has_exactly_one_winner(db_url):
    """Many threads, each its own connection, race `completed` against `cancelled` on one row."""
    for _ in range(40):
        job_id = _new_job(db_url, JobStatus.RUNNING)
        barrier = threading.Barrier(4)
        wins = []

        def race(to):
            barrier.wait()
            with session_scope(db_url) as session:
                if job_rows.transition(session, job_id, to, cancellation_reason="user_requested"
                                       if to is JobStatus.CANCELLED else None):
                    wins.append(to)

        threads = [threading.Thread(target=race, args=(to,))
                   for to in (JobStatus.COMPLETED, JobStatus.CANCELLED) * 2]
        [t.start() for t in threads]
        [t.join() for t in threads]
        with session_scope(db_url) as session:
            status = session.get(Job, job_id).status
            terminal_events = [e.kind for e in session.scalars(select(JobEvent).where(JobEvent.job_id == job_id))
                               if e.kind in ("completed", "cancelled")]
        assert len(wins) == 1 and wins[0].value == status and terminal_events == [status]


def test_item_counters_are_exact_under_concurrent_writers(db_url):
    job_id = str(uuid.uuid4())
    with session_scope(db_url) as session:
        job_rows.create_job(session, job_id, ["d"] * 40, {})

    def write(indexes):
        for i in indexes:
            with transaction(db_url) as conn:
                job_rows.record_item(conn, job_id, i, "analyze",
                                     ItemStatus.DONE if i % 4 else ItemStatus.FAILED, result={"i": i})

    threads = [threading.Thread(target=write, args=(range(k, 40, 4),)) for k in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    with session_scope(db_url) as session:
        job = session.get(Job, job_id)
        assert (job.completed_items, job.failed_items) == (30, 10)
        assert job_rows.finished_indexes(session, job_id) == set(range(40))
