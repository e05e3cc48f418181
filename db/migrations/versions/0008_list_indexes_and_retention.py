"""indexes matched to the job lists and to retention; self-references that a prune can delete

Every list filter (status, tenant, tenant + status, pipeline, reason) gets an index ending in the
list's order, ``created_at DESC, id``: the first page reads 50 index entries, not every matching
row sorted. The single-column indexes they start with go (each index costs every insert).
``(finished_at, status, cancellation_reason)`` serves a prune (jobs that ended before a cutoff) and
/metrics (counts of what ended since the last look); ``(status, finished_at)`` its latency sample.

On PostgreSQL, ``parent_job_id`` and ``resumed_from`` become ``ON DELETE SET NULL`` (the other
references to a job were ``ON DELETE CASCADE`` from the start): a prune deleting an old job leaves
the jobs pointing at it. SQLite can't alter a constraint without copying the table; there the prune
clears those references itself (``db.jobs.delete_jobs``).

Revision ID: 0008
Revises: 0007
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LIST_INDEXES = {
    "ix_jobs_created_id": [],
    "ix_jobs_status_created_id": ["status"],
    "ix_jobs_tenant_created_id": ["tenant"],
    "ix_jobs_tenant_status_created_id": ["tenant", "status"],
    "ix_jobs_pipeline_created_id": ["pipeline"],
    "ix_jobs_reason_created_id": ["cancellation_reason"],
}
REPLACED = {"ix_jobs_status": ["status"], "ix_jobs_tenant": ["tenant"], "ix_jobs_pipeline": ["pipeline"],
            "ix_jobs_created_at": ["created_at"]}
SELF_REFERENCES = ("parent_job_id", "resumed_from")


def upgrade() -> None:
    for name, columns in LIST_INDEXES.items():
        op.create_index(name, "jobs", [*columns, sa.text("created_at DESC"), "id"])
    op.create_index("ix_jobs_finished_status_reason", "jobs", ["finished_at", "status", "cancellation_reason"])
    op.create_index("ix_jobs_status_finished", "jobs", ["status", "finished_at"])
    for name in REPLACED:
        op.drop_index(name, table_name="jobs")
    if op.get_bind().dialect.name == "postgresql":
        _self_references("SET NULL")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _self_references(None)
    for name, columns in REPLACED.items():
        op.create_index(name, "jobs", columns)
    op.drop_index("ix_jobs_status_finished", table_name="jobs")
    op.drop_index("ix_jobs_finished_status_reason", table_name="jobs")
    for name in LIST_INDEXES:
        op.drop_index(name, table_name="jobs")


def _self_references(ondelete: str | None) -> None:
    """Re-create the foreign keys of ``jobs`` onto ``jobs`` with ``ondelete``, whatever they were named."""
    for fk in sa.inspect(op.get_bind()).get_foreign_keys("jobs"):
        column = fk["constrained_columns"][0]
        if fk["referred_table"] == "jobs" and column in SELF_REFERENCES:
            op.drop_constraint(fk["name"], "jobs", type_="foreignkey")
            op.create_foreign_key(fk["name"], "jobs", "jobs", [column], ["id"], ondelete=ondelete)
