"""pipelines: each job names its pipeline; items can be interrupted; heartbeat_at (never read) goes

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("pipeline", sa.String(length=64), nullable=False, server_default="documents"))
        batch.drop_column("heartbeat_at")
        batch.create_index("ix_jobs_pipeline", ["pipeline"])
    with op.batch_alter_table("job_items") as batch:  # a stage's name may be up to 64 characters
        batch.alter_column("stage", type_=sa.String(length=64), existing_type=sa.String(length=16))


def downgrade() -> None:
    with op.batch_alter_table("job_items") as batch:
        batch.alter_column("stage", type_=sa.String(length=16), existing_type=sa.String(length=64))
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_pipeline")
        batch.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
        batch.drop_column("pipeline")
