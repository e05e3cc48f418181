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
from db.vocabulary import EventKind, ItemStatus, JobStatus


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


def test_migration_0014_partial_indexes_up_and_down_with_rows(db_url):
    """0014 re-creates indexes of a populated ``jobs`` as partial ones and back; every row stays
    findable by each of them, and a job is still resumed at most once either way."""
    from sqlalchemy import text
    from sqlalchemy.exc import IntegrityError

    downgrade(db_url, "0013")
    ids = [str(uuid.uuid4()) for _ in range(4)]
    with session_scope(db_url) as session:
        job_rows.create_jobs(session, [
            {"id": ids[0], "inputs": ["a"], "options": {}, "pipeline": "documents", "tenant": "acme"},
            {"id": ids[1], "inputs": ["a"], "options": {}, "pipeline": "documents", "supersede_key": "k"}])
        job_rows.create_jobs(session, [
            {"id": ids[2], "inputs": ["a"], "options": {}, "pipeline": "documents", "parent_job_id": ids[0]}])
        session.execute(text("UPDATE jobs SET status = 'cancelled', cancellation_reason = 'timeout', "
                             "finished_at = created_at WHERE id = :id"), {"id": ids[0]})
    upgrade(db_url)
    names = {index["name"] for index in inspect(get_engine(db_url)).get_indexes("jobs")}
    assert {"ix_jobs_tenant_created_id", "ix_jobs_reason_created_id", "ix_jobs_supersede_key",
            "ix_jobs_parent_job_id", "ix_jobs_finished_status_reason", "ix_jobs_status_finished"} <= names

    def found() -> list:
        with session_scope(db_url) as session:
            return [session.scalars(select(Job.id).where(where)).all() for where in (
                Job.tenant == "acme", Job.cancellation_reason == "timeout", Job.supersede_key == "k",
                Job.parent_job_id == ids[0], Job.finished_at.is_not(None))]

    assert found() == [[ids[0]], [ids[0]], [ids[1]], [ids[2]], [ids[0]]]
    assert "IS NOT NULL" in _index_sql(db_url, "ix_jobs_tenant_created_id").upper()
    with session_scope(db_url) as session:
        job_rows.create_jobs(session, [{"id": ids[3], "inputs": ["a"], "options": {}, "pipeline": "documents"}])
        session.execute(text("UPDATE jobs SET resumed_from = :old WHERE id = :id"), {"old": ids[0], "id": ids[3]})
    with pytest.raises(IntegrityError), session_scope(db_url) as session:
        session.execute(text("UPDATE jobs SET resumed_from = :old WHERE id = :id"), {"old": ids[0], "id": ids[2]})
    downgrade(db_url, "0013")
    assert found() == [[ids[0]], [ids[0]], [ids[1]], [ids[2]], [ids[0]]]
    assert "IS NOT NULL" not in _index_sql(db_url, "ix_jobs_tenant_created_id").upper()
    with pytest.raises(IntegrityError), session_scope(db_url) as session:
        session.execute(text("UPDATE jobs SET resumed_from = :old WHERE id = :id"), {"old": ids[0], "id": ids[2]})
    upgrade(db_url)
    assert found() == [[ids[0]], [ids[0]], [ids[1]], [ids[2]], [ids[0]]]


def _index_sql(url: str, name: str) -> str:
    """The definition of index ``name`` as the database keeps it."""
    from sqlalchemy import text

    query = ("SELECT indexdef FROM pg_indexes WHERE indexname = :name" if url.startswith("postgresql")
             else "SELECT sql FROM sqlite_master WHERE name = :name")
    with get_engine(url).connect() as conn:
        return conn.scalar(text(query), {"name": name})


@pytest.mark.postgres
def test_migration_0015_every_string_column_compares_bytes_up_and_down_with_rows(postgres_server):
    """At head every ``VARCHAR`` column of the schema is in the ``"C"`` collation on PostgreSQL
    (also those a later migration adds: declare them with ``db.models.byte_string``); 0015 moves a
    populated schema there and back with its foreign keys working. (SQLite compares bytes already.)"""
    from sqlalchemy import text
    from sqlalchemy.exc import IntegrityError

    db_url = postgres_server.create_database(f"andon_{uuid.uuid4().hex[:12]}")
    upgrade(db_url)
    query = text("SELECT table_name, column_name, collation_name FROM information_schema.columns "
                 "WHERE table_schema = 'public' AND data_type = 'character varying' AND table_name <> 'alembic_version'")

    def collations() -> dict[tuple[str, str], str | None]:
        with get_engine(db_url).connect() as conn:
            return {(table, column): collation for table, column, collation in conn.execute(query)}

    assert set(collations().values()) == {"C"}
    downgrade(db_url, "0014")
    assert "C" not in set(collations().values())
    parent, child = str(uuid.uuid4()), str(uuid.uuid4())
    with session_scope(db_url) as session:
        job_rows.create_jobs(session, [{"id": parent, "inputs": ["a"], "options": {}, "pipeline": "documents",
                                        "tags": ["t"]}])
        job_rows.create_jobs(session, [{"id": child, "inputs": ["a"], "options": {}, "pipeline": "documents",
                                        "parent_job_id": parent}])
    upgrade(db_url)
    assert set(collations().values()) == {"C"}
    with session_scope(db_url) as session:
        assert session.scalar(select(Job.id).where(Job.parent_job_id == parent)) == child
        assert [e.kind for e in session.scalars(select(JobEvent).where(JobEvent.job_id == parent))] == ["submitted"]
    with pytest.raises(IntegrityError), session_scope(db_url) as session:  # the foreign keys still hold
        job_rows.add_event(session, str(uuid.uuid4()), EventKind.SUBMITTED)
    with session_scope(db_url) as session:
        session.execute(text("DELETE FROM jobs WHERE id = :id"), {"id": parent})
    with session_scope(db_url) as session:  # and still cascade
        assert session.scalar(select(Job.parent_job_id).where(Job.id == child)) is None
        assert not session.scalars(select(JobEvent).where(JobEvent.job_id == parent)).all()
