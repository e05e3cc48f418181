"""Supersede keys: submitting a job with a key ends every unfinished job of the tenant with that key.

Submits with one key are serialized on a ``supersede_keys`` row: :func:`claim` writes it first thing
in the transaction that makes the new job, so a second submit with the key waits there until the
first commits (PostgreSQL holds the row lock to commit; SQLite holds its one write lock), then sees
the first's job among the unfinished ones. The newest submit therefore always wins: it supersedes
every job committed before it and no later one can miss it. The cancels themselves are requested
after the commit (by the caller), so a job may be seen ``pending`` for a moment after its successor
is; it never runs past its next checkpoint.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.models import Job, SupersedeKey, utcnow
from db.vocabulary import TERMINAL_STATUSES


def claim(session: Session, tenant: str | None, key: str, job_id: str) -> list[str]:
    """Make ``job_id`` the newest job for ``key`` (waiting for any submit holding the key) and return
    the tenant's unfinished jobs with that key, oldest first: the ones it supersedes.

    Must be the session's first write: on SQLite a transaction that has already read can't wait
    for the write lock, only fail."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    now = utcnow()
    statement = insert(SupersedeKey).values(tenant=tenant or "", key=key, job_id=job_id, updated_at=now)
    session.execute(statement.on_conflict_do_update(index_elements=["tenant", "key"],
                                                    set_={"job_id": job_id, "updated_at": now}))
    owner = Job.tenant.is_(None) if tenant is None else Job.tenant == tenant
    return list(session.scalars(
        select(Job.id).where(Job.supersede_key == key, owner,
                             Job.status.not_in([s.value for s in TERMINAL_STATUSES]))
        .order_by(Job.created_at, Job.id)))
