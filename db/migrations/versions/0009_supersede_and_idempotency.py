"""supersede keys and idempotency keys: a job's supersede key, the row that serializes submits with
one key, and the stored first answer to each Idempotency-Key

Revision ID: 0009
Revises: 0008
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("supersede_key", sa.String(length=128), nullable=True))
    op.create_index("ix_jobs_supersede_key", "jobs", ["supersede_key"])
    op.create_table(
        "supersede_keys",
        sa.Column("tenant", sa.String(length=64), primary_key=True),
        sa.Column("key", sa.String(length=128), primary_key=True),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("tenant", sa.String(length=64), primary_key=True),
        sa.Column("key", sa.String(length=128), primary_key=True),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("response", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_idempotency_keys_created_at", "idempotency_keys", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_idempotency_keys_created_at", table_name="idempotency_keys")
    op.drop_table("idempotency_keys")
    op.drop_table("supersede_keys")
    op.drop_index("ix_jobs_supersede_key", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("supersede_key")
