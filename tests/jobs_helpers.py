"""Small helpers to submit jobs and read their rows in tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, event, select

from api import service
from db.models import Job, JobEvent, JobItem
from db.session import session_scope
from db.vocabulary import JobStatus
from tests.procs import wait_for

TERMINAL = {"cancelled", "completed", "failed"}


@contextmanager
def statements_sent(engine: Engine) -> Iterator[list[tuple[str, Any]]]:
    """Every statement ``engine`` sends while the block runs, with its parameters, in order (the
    list fills as they go)."""
    sent: list[tuple[str, Any]] = []

    def record(_conn, _cursor, statement, parameters, _context, _executemany) -> None:
        sent.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", record)


def docs(n: int, prefix: str = "Doc") -> list[str]:
    return [f"{prefix} {i}. The quick brown fox jumps over the lazy dog. Foxes are quick." for i in range(n)]


#: The pipelines stop-path tests run against: the built-in one, and users' (tests/fixtures).
PIPELINES = ["documents", "user-sync", "user-async"]


def submit(n: int = 5, stage_delay_s: float = 0.0, documents: list[str] | None = None, options=None,
           pipeline: str = "documents", **kwargs) -> str:
    options = {"stage_delay_s": stage_delay_s, **(options or {})}
    if pipeline == "user-async":
        n *= 4  # four items in flight: as many rounds of stages as the others
    items = documents or (docs(n) if pipeline == "documents" else [f"item {i}" for i in range(n)])
    return service.submit_job(items, options, pipeline=pipeline, **kwargs).job_id


def job_row(job_id: str) -> Job:
    with session_scope() as session:
        return session.get(Job, job_id)


def items(job_id: str) -> list[JobItem]:
    with session_scope() as session:
        return list(session.scalars(select(JobItem).where(JobItem.job_id == job_id).order_by(JobItem.index)))


def events(job_id: str) -> list[JobEvent]:
    with session_scope() as session:
        return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))


def wait_status(job_id: str, statuses, timeout: float = 30) -> Job:
    statuses = {statuses} if isinstance(statuses, str) else set(statuses)
    return wait_for(lambda: (j := job_row(job_id)) and j.status in statuses and j, timeout,
                    what=f"job {job_id} to reach {statuses}")


def wait_terminal(job_id: str, timeout: float = 30) -> Job:
    return wait_status(job_id, TERMINAL, timeout)


def wait_items(job_id: str, count: int, timeout: float = 30) -> Job:
    return wait_for(lambda: (j := job_row(job_id)).completed_items + j.failed_items >= count and j, timeout,
                    what=f"job {job_id} to finish {count} items")


def terminal_events(job_id: str) -> list[str]:
    return [e.kind for e in events(job_id) if e.kind in TERMINAL]


def assert_one_terminal(job_id: str) -> Job:
    job = job_row(job_id)
    assert JobStatus(job.status).is_terminal, job.status
    assert terminal_events(job_id) == [job.status], terminal_events(job_id)
    return job


def while_sweeping(predicate, timeout: float, what: str):
    """Poll ``predicate`` while keeping the broker-sweep lock free, so a worker started with a fast
    sweep (``ANDON_BROKER_SWEEP_S``) gets every turn. The suite's other workers sweep every 30 s and
    hold the lock that long each time, with settings that don't do what the test waits for; a lock
    freed once lets whichever of them comes next take it again (the holder's next turn falls right
    at its lock's expiry)."""
    from tasks.cancellation.keys import sweep_lock_key
    from tasks.process import get_redis

    def swept():
        value = predicate()
        if not value:
            get_redis().delete(sweep_lock_key())
        return value

    return wait_for(swept, timeout, interval=0.05, what=what)


def is_terminal(job_id: str) -> bool:
    return JobStatus(job_row(job_id).status).is_terminal
