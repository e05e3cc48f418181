"""indexes for reads at a million rows: tag lists, status with reason, an item's LLM usage

- ``job_tags.created_at`` (its job's ``created_at``, copied) and ``(tag, created_at DESC, job_id)``:
  a tag's list page is an index range scan in the list's order, not a sort of every job with the
  tag (235 ms at 1,000,000 jobs, 10,000 of them tagged). It replaces ``ix_job_tags_tag``.
- ``(status, cancellation_reason, created_at DESC, id)``: a list by status and reason (and a count
  of the unfinished jobs by reason, /metrics) reads only matching entries; without it a status and
  reason that match nothing scanned every job of that reason.
- ``job_items (job_id) WHERE prompt_tokens IS NOT NULL``: a job's LLM totals (``GET /api/jobs/{id}``)
  read only the items that reported usage, not all 100,000 items of a big job.

Revision ID: 0013
Revises: 0012
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

USAGE_WHERE = sa.text("prompt_tokens IS NOT NULL")


def upgrade() -> None:
    op.add_column("job_tags", sa.Column("created_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE job_tags SET created_at = (SELECT jobs.created_at FROM jobs WHERE jobs.id = job_tags.job_id)")
    op.create_index("ix_job_tags_tag_created_id", "job_tags", ["tag", sa.text("created_at DESC"), "job_id"])
    op.drop_index("ix_job_tags_tag", table_name="job_tags")
    op.create_index("ix_jobs_status_reason_created_id", "jobs",
                    ["status", "cancellation_reason", sa.text("created_at DESC"), "id"])
    op.create_index("ix_job_items_usage", "job_items", ["job_id"], sqlite_where=USAGE_WHERE,
                    postgresql_where=USAGE_WHERE)


def downgrade() -> None:
    op.drop_index("ix_job_items_usage", table_name="job_items")
    op.drop_index("ix_jobs_status_reason_created_id", table_name="jobs")
    op.create_index("ix_job_tags_tag", "job_tags", ["tag"])
    op.drop_index("ix_job_tags_tag_created_id", table_name="job_tags")
    with op.batch_alter_table("job_tags") as batch:
        batch.drop_column("created_at")
