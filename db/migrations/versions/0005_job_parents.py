"""job_parents: the jobs a job waits for when it waits for several (a Celery chord's body)

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "job_parents",
        sa.Column("job_id", sa.String(length=36), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("parent_id", sa.String(length=36), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    )
    op.create_index("ix_job_parents_parent_id", "job_parents", ["parent_id"])


def downgrade() -> None:
    op.drop_index("ix_job_parents_parent_id", table_name="job_parents")
    op.drop_table("job_parents")
