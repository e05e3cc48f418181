"""jobs.deferred (a child waiting for its parent); a job is resumed at most once


Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("deferred", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.create_unique_constraint("uq_jobs_resumed_from", ["resumed_from"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_constraint("uq_jobs_resumed_from", type_="unique")
        batch_op.drop_column("deferred")
