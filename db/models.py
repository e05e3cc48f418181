"""The tables: a job, one row per finished item (the partial results), one row per event, and the
labels a job was submitted with (its tags, for finding and bulk-cancelling a batch), and the jobs a
job waits for when it waits for several (a chord's body).

Portable SQLAlchemy types only: the same models run on SQLite (embedded) and PostgreSQL.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC everywhere; SQLite forgets the zone, so put it back on the way out."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, list[Any]: JSON}


def byte_string(length: int) -> String:
    """A string column compared byte by byte: andon's strings are ids, statuses, reasons, names,
    tags and keys, matched and ordered as values, never for people to read in their language's order.

    On PostgreSQL that is the ``"C"`` collation (migration 0015): in the database's own collation
    every comparison of such a string goes through ``strcoll``, in every lookup, index entry and
    foreign-key check on a job id. SQLite compares bytes already (``BINARY``)."""
    return String(length).with_variant(String(length, collation="C"), "postgresql")


def _list_index(name: str, *columns: str, where: str | None = None) -> Index:
    """An index for ``GET /api/jobs`` filtered by ``columns``: it ends in the list's own order."""
    return Index(name, *columns, text("created_at DESC"), "id", **_partial(where))


def _partial(where: str | None) -> dict[str, Any]:
    """An index only of the rows where ``where`` holds (migration 0014): a row outside it costs the
    index nothing on INSERT or UPDATE — on PostgreSQL every update that moves a job's status writes
    an entry in every index it is in. A query uses it only if its WHERE implies ``where``
    (``col = ?``, ``col > ?`` and ``col IN (…)`` imply ``col IS NOT NULL`` on both databases)."""
    if where is None:
        return {}
    return {"sqlite_where": text(where), "postgresql_where": text(where)}


class Job(Base):
    __tablename__ = "jobs"
    # migration 0008: one index per list filter, in the list's order; what ended when (prune, /metrics).
    # Migration 0014: the indexes over columns that are NULL for most rows (or for every live job)
    # hold only the rows where they aren't.
    __table_args__ = (
        _list_index("ix_jobs_created_id"),
        _list_index("ix_jobs_status_created_id", "status"),
        _list_index("ix_jobs_tenant_created_id", "tenant", where="tenant IS NOT NULL"),
        _list_index("ix_jobs_tenant_status_created_id", "tenant", "status", where="tenant IS NOT NULL"),
        _list_index("ix_jobs_pipeline_created_id", "pipeline"),
        _list_index("ix_jobs_reason_created_id", "cancellation_reason", where="cancellation_reason IS NOT NULL"),
        _list_index("ix_jobs_status_reason_created_id", "status", "cancellation_reason"),  # 0013
        # Partial on PostgreSQL only, the two of them: there the first serves every reader of what
        # ended when, and the second only counts the ended jobs without a ``finished_at`` (/metrics),
        # so it holds the jobs not ended. SQLite's planner (no statistics) reads what ended when by
        # status through the second (an equality on ``status`` over a range on ``finished_at``) and
        # counts those jobs through the first: made partial, either would have it read every ended job.
        Index("ix_jobs_finished_status_reason", "finished_at", "status", "cancellation_reason",
              postgresql_where=text("finished_at IS NOT NULL")),
        Index("ix_jobs_status_finished", "status", "finished_at", postgresql_where=text("finished_at IS NULL")),
        Index("ix_jobs_supersede_key", "supersede_key", **_partial("supersede_key IS NOT NULL")),
        Index("ix_jobs_parent_job_id", "parent_job_id", **_partial("parent_job_id IS NOT NULL")),
        # a job is resumed at most once; partial on PostgreSQL only: SQLite keeps the table constraint
        # of migration 0002 (dropping one there is a copy of the whole table)
        Index("uq_jobs_resumed_from", "resumed_from", unique=True,
              postgresql_where=text("resumed_from IS NOT NULL")),
    )

    id: Mapped[str] = mapped_column(byte_string(36), primary_key=True)
    #: Whose job it is: the tenant of the API token that submitted it (None without tenants).
    tenant: Mapped[str | None] = mapped_column(byte_string(64))
    status: Mapped[str] = mapped_column(byte_string(16))
    #: The pipeline the job runs (``documents`` is built in).
    pipeline: Mapped[str] = mapped_column(byte_string(64), default="documents", server_default="documents")
    #: The job's items, as submitted (JSON). The column keeps its first name, ``documents``.
    inputs: Mapped[list[Any]] = mapped_column("documents", JSON)
    options: Mapped[dict[str, Any]] = mapped_column(default=dict)
    total_items: Mapped[int] = mapped_column(Integer)
    completed_items: Mapped[int] = mapped_column(Integer, default=0)
    failed_items: Mapped[int] = mapped_column(Integer, default=0)

    cancellation_reason: Mapped[str | None] = mapped_column(byte_string(32))
    cancellation_message: Mapped[str | None] = mapped_column(Text)
    cancellation_source: Mapped[str | None] = mapped_column(byte_string(32))
    cancelled_at_item: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    resumable: Mapped[bool] = mapped_column(default=False)
    #: The run that owns the job: raised by one each time a run starts or takes over, and checked on
    #: every item write, so a run that lost the job (a duplicate delivery took over from it) can't
    #: write another item or end it. ``owner`` names that run (host:pid:nonce).
    fence: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    owner: Mapped[str | None] = mapped_column(byte_string(128))
    #: The Celery queue its message was sent to (None: the default queue), for re-sending it.
    queue: Mapped[str | None] = mapped_column(byte_string(64))
    #: Submitting another job of the same tenant with this key cancels this one (source ``superseded``).
    supersede_key: Mapped[str | None] = mapped_column(byte_string(128))
    #: Waiting for its parent to complete; enqueued then (or cancelled if the parent isn't completed).
    deferred: Mapped[bool] = mapped_column(default=False, server_default=false())

    deadline_s: Mapped[float | None] = mapped_column(Float)
    #: Where andon POSTs the job object, signed, once the job is terminal (tasks/webhooks.py).
    callback_url: Mapped[str | None] = mapped_column(byte_string(2048))
    parent_job_id: Mapped[str | None] = mapped_column(byte_string(36), ForeignKey("jobs.id", ondelete="SET NULL"))
    #: The cancelled job this one resumes (each job is resumed at most once).
    resumed_from: Mapped[str | None] = mapped_column(byte_string(36), ForeignKey("jobs.id", ondelete="SET NULL"))
    #: The job that resumed this one (by hand or by its policy), if any.
    resumed_by: Mapped[str | None] = mapped_column(byte_string(36))

    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    cancel_requested_at: Mapped[datetime | None]
    cancel_observed_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    items: Mapped[list[JobItem]] = relationship(back_populates="job", order_by="JobItem.index")
    tag_rows: Mapped[list[JobTag]] = relationship(order_by="JobTag.tag", cascade="all, delete-orphan")

    @property
    def tags(self) -> list[str]:
        return [row.tag for row in self.tag_rows]
    events: Mapped[list[JobEvent]] = relationship(back_populates="job", order_by="JobEvent.id")


class JobItem(Base):
    """One item that ended: written (and committed) the moment it is done, has failed, or was
    interrupted in flight by a cancel (then ``stage`` is the stage it reached and ``result`` what it
    had produced, if anything). Interrupted items are not counted as failed, and resume runs them."""

    __tablename__ = "job_items"
    __table_args__ = (
        UniqueConstraint("job_id", "index", name="uq_job_items_job_index"),
        # migration 0013: a job's LLM totals read only the items that reported usage
        Index("ix_job_items_usage", "job_id", sqlite_where=text("prompt_tokens IS NOT NULL"),
              postgresql_where=text("prompt_tokens IS NOT NULL")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(byte_string(36), ForeignKey("jobs.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    stage: Mapped[str] = mapped_column(byte_string(64))  # last stage reached
    status: Mapped[str] = mapped_column(byte_string(16))  # done / failed / interrupted
    result: Mapped[Any | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: How many times a stage of this item was tried again (its Retry).
    retries: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: LLM usage the item reported (counted from the stream when the server sent none: ``estimated``).
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    usage_cut_short: Mapped[bool | None]
    usage_estimated: Mapped[bool | None]

    job: Mapped[Job] = relationship(back_populates="items")


class JobEvent(Base):
    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(byte_string(36), ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(byte_string(32))
    reason: Mapped[str | None] = mapped_column(byte_string(32))
    source: Mapped[str | None] = mapped_column(byte_string(32))
    actor: Mapped[str | None] = mapped_column(byte_string(128))
    detail: Mapped[dict[str, Any] | None]
    at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[Job] = relationship(back_populates="events")


class JobTag(Base):
    """A label a job was submitted with (``batch-7``, ``customer:acme``): a row each, so a page of
    the jobs with a tag, newest first, is one index range scan on any database."""

    __tablename__ = "job_tags"
    # migration 0013: a tag's list in the list's order (``created_at`` is the job's, copied)
    __table_args__ = (Index("ix_job_tags_tag_created_id", "tag", text("created_at DESC"), "job_id"),)

    job_id: Mapped[str] = mapped_column(byte_string(36), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    tag: Mapped[str] = mapped_column(byte_string(64), primary_key=True)
    #: The job's ``created_at``: set with the row (``db.jobs.create_job``, ``create_jobs``), never changed.
    created_at: Mapped[datetime | None]


class JobParent(Base):
    """One more job this job waits for, when it waits for several: a Celery chord's body waits for
    every header job. (A single parent is ``jobs.parent_job_id``.) If any of them doesn't complete,
    the job ends ``dependency_failed`` without running."""

    __tablename__ = "job_parents"

    job_id: Mapped[str] = mapped_column(byte_string(36), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    parent_id: Mapped[str] = mapped_column(byte_string(36), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True,
                                           index=True)


class SupersedeKey(Base):
    """The newest job submitted with a supersede key. Submits with one key each write this row first,
    in the transaction that makes their job: the row lock (PostgreSQL) or the write lock (SQLite)
    serializes them across API processes, so each sees every job submitted before it."""

    __tablename__ = "supersede_keys"

    #: ``""`` without tenants (a primary key can't be NULL).
    tenant: Mapped[str] = mapped_column(byte_string(64), primary_key=True)
    key: Mapped[str] = mapped_column(byte_string(128), primary_key=True)
    job_id: Mapped[str] = mapped_column(byte_string(36))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class IdempotencyKey(Base):
    """The first request made with an ``Idempotency-Key``: what it asked (a hash of the route and its
    validated body) and, once it has one, its answer — replayed to every retry for 24 hours. A row
    without an answer is a request in progress; the first inserter owns it."""

    __tablename__ = "idempotency_keys"

    tenant: Mapped[str] = mapped_column(byte_string(64), primary_key=True)
    key: Mapped[str] = mapped_column(byte_string(128), primary_key=True)
    request_hash: Mapped[str] = mapped_column(byte_string(64))
    status_code: Mapped[int | None] = mapped_column(Integer)
    response: Mapped[Any | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
