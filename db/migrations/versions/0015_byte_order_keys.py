"""every string column compared byte by byte on PostgreSQL (the ``"C"`` collation)

andon's string columns hold ids, statuses, reasons, names, tags and keys: values matched and ordered
as values, never sorted for people. In the database's collation each comparison of one went through
``strcoll``, and every job id lookup, index entry and foreign-key check paid for it. In ``C.UTF-8``
(the cheapest linguistic one), on one server, 45 batches each: a bulk cancel's ``UPDATE`` of 1,000
queued jobs took 30.0 / 40.2 / 41.1 ms against 27.4 / 38.3 / 37.1 in ``"C"``, the INSERT of their
2,000 events 23.2 / 33.8 / 33.2 against 20.7 / 31.3 / 31.6 (see ``db.models.byte_string``).

Only the collation changes, so PostgreSQL rewrites no table; it rebuilds the indexes on these
columns. Every column moves in one transaction: a foreign key between columns of two collations
would have no collation to compare with. SQLite compares bytes already, and changes nothing.

Revision ID: 0015
Revises: 0014
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: table: {column: length} — every ``VARCHAR`` column of the schema at revision 0014
COLUMNS = {
    "jobs": {"id": 36, "tenant": 64, "status": 16, "pipeline": 64, "cancellation_reason": 32,
             "cancellation_source": 32, "owner": 128, "queue": 64, "supersede_key": 128, "callback_url": 2048,
             "parent_job_id": 36, "resumed_from": 36, "resumed_by": 36},
    "job_items": {"job_id": 36, "stage": 64, "status": 16},
    "job_events": {"job_id": 36, "kind": 32, "reason": 32, "source": 32, "actor": 128},
    "job_tags": {"job_id": 36, "tag": 64},
    "job_parents": {"job_id": 36, "parent_id": 36},
    "supersede_keys": {"tenant": 64, "key": 128, "job_id": 36},
    "idempotency_keys": {"tenant": 64, "key": 128, "request_hash": 64},
}


def _collate(collation: str) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, columns in COLUMNS.items():
        changes = ", ".join(f'ALTER COLUMN "{name}" TYPE VARCHAR({length}) COLLATE {collation}'
                            for name, length in columns.items())
        op.execute(f'ALTER TABLE "{table}" {changes}')


def upgrade() -> None:
    _collate('"C"')


def downgrade() -> None:
    _collate("pg_catalog.default")
