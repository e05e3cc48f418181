"""partial indexes on ``jobs``: no entry for a row where the indexed column is NULL

Most rows have no tenant (without tenants), no cancellation reason, no supersede key, no parent and
no ``resumed_from``; a live job has no ``finished_at``. Every index still held an entry for each of
those rows, and on PostgreSQL every update that moves a job's status (not a HOT update: ``status``
is indexed) wrote a new entry in each of the 13 indexes of ``jobs`` — most of a bulk cancel's
server time. Those indexes now hold only the rows where the column is set; each of their readers
asks for a value (``col = ?``, a range, an ``IN`` list), which implies ``col IS NOT NULL``, so it
still uses them.

On PostgreSQL only, ``(finished_at, status, cancellation_reason)`` holds the jobs that ended and
``(status, finished_at)`` those that didn't: the first serves every reader of what ended when (the
prune, the result sweep, /metrics and its latency sample), the second only counts the ended jobs
without a ``finished_at`` (/metrics). SQLite keeps both whole: its planner (no statistics) takes an
equality on ``status`` over a range on ``finished_at`` and reads what ended when through the second,
and counts those jobs through the first; made partial, either had it read every ended job instead.

``resumed_from``'s unique constraint becomes a partial unique index on PostgreSQL; SQLite keeps the
constraint (it can't drop one without copying the whole table).

Revision ID: 0014
Revises: 0013
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LIST = [sa.text("created_at DESC"), "id"]
#: name: (columns, the column that is NULL for most rows)
PARTIAL = {
    "ix_jobs_tenant_created_id": (["tenant", *LIST], "tenant"),
    "ix_jobs_tenant_status_created_id": (["tenant", "status", *LIST], "tenant"),
    "ix_jobs_reason_created_id": (["cancellation_reason", *LIST], "cancellation_reason"),
    "ix_jobs_supersede_key": (["supersede_key"], "supersede_key"),
    "ix_jobs_parent_job_id": (["parent_job_id"], "parent_job_id"),
}

#: PostgreSQL only: name: (columns, predicate)
BY_END = {
    "ix_jobs_finished_status_reason": (["finished_at", "status", "cancellation_reason"], "finished_at IS NOT NULL"),
    "ix_jobs_status_finished": (["status", "finished_at"], "finished_at IS NULL"),
}


def _where(clause: str) -> dict[str, sa.TextClause]:
    return {"sqlite_where": sa.text(clause), "postgresql_where": sa.text(clause)}


def upgrade() -> None:
    for name, (columns, column) in PARTIAL.items():
        op.drop_index(name, table_name="jobs")
        op.create_index(name, "jobs", columns, **_where(f"{column} IS NOT NULL"))
    if op.get_bind().dialect.name == "postgresql":
        op.drop_constraint("uq_jobs_resumed_from", "jobs", type_="unique")
        op.create_index("uq_jobs_resumed_from", "jobs", ["resumed_from"], unique=True,
                        postgresql_where=sa.text("resumed_from IS NOT NULL"))
        for name, (columns, where) in BY_END.items():
            op.drop_index(name, table_name="jobs")
            op.create_index(name, "jobs", columns, postgresql_where=sa.text(where))


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for name, (columns, _) in BY_END.items():
            op.drop_index(name, table_name="jobs")
            op.create_index(name, "jobs", columns)
        op.drop_index("uq_jobs_resumed_from", table_name="jobs")
        op.create_unique_constraint("uq_jobs_resumed_from", "jobs", ["resumed_from"])
    for name, (columns, _) in PARTIAL.items():
        op.drop_index(name, table_name="jobs")
        op.create_index(name, "jobs", columns)
