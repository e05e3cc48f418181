"""The one writer of a job's status: the only module that moves a job between states.

Every move is a conditional UPDATE in :func:`db.jobs.transition` (two writers racing: exactly one
wins, the loser changes nothing), and reaching a terminal state stamps ``finished_at`` and records
its event in the same transaction. Who calls: the job's own run (start, finish), a cancel request
(queued → cancelled, running → cancelling), and finalizers for a process that died under its job.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from typing import Any

from sqlalchemy import Connection, Insert, Integer, Row, Select, Update, bindparam, case, select, update
from sqlalchemy.orm import Session

from db import jobs as job_rows
from db.jobs import StoredItem
from db.models import Job, JobEvent, JobItem, utcnow
from db.session import get_engine, session_scope, statement_writes, transaction
from db.settings import get_settings
from db.vocabulary import CancellationReason, CancellationSource, EventKind, JobStatus
from tasks import webhooks
from tasks.cancellation import CancellationError, CancelRequest
from tasks.errors import JobAlreadyTerminal, JobNotFound
from tasks.policy import resumable

__all__ = [
    "JobOutcome", "add_request_event", "cancel_queued", "end_cancelled", "end_failed", "finish_ran_through",
    "mark_requested", "mark_running_requested", "outcome_of", "record_winner", "requeue", "requested_cancels",
    "start", "take_over",
]


@dataclass(frozen=True)
class JobOutcome:
    job_id: str
    status: JobStatus
    ran: bool  # False when the job was already terminal (e.g. cancelled while queued)
    reason: CancellationReason | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "status": self.status.value, "ran": self.ran,
                "reason": self.reason.value if self.reason else None, "error": self.error}


def outcome_of(job_id: str, ran: bool) -> JobOutcome:
    """What the row says now (someone else may have ended the job first)."""
    with session_scope() as session:
        row = session.get(Job, job_id)
        reason = CancellationReason(row.cancellation_reason) if row.cancellation_reason else None
        return JobOutcome(job_id, JobStatus(row.status), ran=ran, reason=reason, error=row.error)


def start(job_id: str, owner: str, pipelines: Collection[str] | None = None) -> Job | None:
    """Queued → running, owned by this run (its fence is ``job.fence``); None if the job is not
    queued any more (another delivery started it, or it ended) or, given ``pipelines``, runs none
    of them. One statement takes the row and reads it back (``UPDATE … RETURNING``), in the
    transaction of its ``started`` event. It takes its turn with the item writers (``transaction``):
    on SQLite, meeting them in the busy handler instead sleeps a millisecond or more per retry.

    Every job pays this once, so it is a prebuilt Core statement on a plain connection, and the
    job comes back as a detached :class:`Job` made from the returned row: the ORM's UPDATE path and
    a Session cost several times the SQL (~2 ms of CPU per job on SQLite)."""
    params: dict[str, Any] = {"job_id": job_id, "now": datetime.now(UTC), "owner": owner}
    if pipelines is not None:
        params["pipelines"] = list(pipelines)
    engine = get_engine()
    if engine.dialect.name == "postgresql":  # one statement, one round trip: the row and its event
        params[job_rows.EVENT_RECORDS] = [job_rows.event_row(job_id, EventKind.STARTED, actor=owner,
                                                             detail={"redelivered": False}, at=params["now"])]
        with statement_writes() as conn:
            row = conn.execute(_started(known=pipelines is not None), params).one_or_none()
    else:
        row = _start_in_transaction(job_id, owner, params, _START if pipelines is None else _START_KNOWN)
    return None if row is None else Job(**{key: row[i] for i, key in enumerate(_JOB_KEYS)})


def _start_in_transaction(job_id: str, owner: str, params: dict[str, Any], statement: Update) -> Row | None:
    """SQLite's start: the row's UPDATE and its event's INSERT in one transaction."""
    with transaction() as conn:
        row = conn.execute(statement, params).one_or_none()
        if row is not None:
            job_rows.add_event(conn, job_id, EventKind.STARTED, actor=owner, detail={"redelivered": False})
    return row


_jobs = Job.__table__
#: The job's attribute for each column RETURNING gives back, in that order (``inputs`` is stored in
#: the column ``documents``).
_JOB_KEYS = [Job.__mapper__.get_property_by_column(column).key for column in _jobs.c]
_START = (update(_jobs).where(_jobs.c.id == bindparam("job_id"), _jobs.c.status == JobStatus.PENDING.value)
          .values(status=JobStatus.RUNNING.value, started_at=bindparam("now", type_=_jobs.c.started_at.type),
                  fence=_jobs.c.fence + 1, owner=bindparam("owner", type_=_jobs.c.owner.type))
          .returning(*_jobs.c))
_START_KNOWN = _START.where(_jobs.c.pipeline.in_(bindparam("pipelines", expanding=True)))


@cache
def _started(known: bool) -> Select:
    """PostgreSQL's start as one statement: ``WITH started AS (UPDATE … RETURNING *), event AS
    (INSERT its started event)`` and the row read back. Committed on its own it is one round trip
    where a transaction took four, the row lock held for that one statement. Its event is inside
    the ``WITH``: the statement names its table for :mod:`tasks.notify` (``INSERTS_INTO``)."""
    started = (_START_KNOWN if known else _START).cte("started")
    event = job_rows.rows_after(started, JobEvent.__table__).cte("started_event")
    return (select(*started.c).add_cte(started).add_cte(event)
            .execution_options(**{job_rows.INSERTS_INTO: JobEvent.__tablename__}))


def take_over(job_id: str, seen_fence: int, owner: str) -> Job | None:
    """A running job whose owner is gone: this run takes it over (a higher fence: the old run, if it
    still runs somewhere, can't write another item). None if someone else moved first."""
    with session_scope() as session:
        won = session.execute(
            update(Job).where(Job.id == job_id, Job.fence == seen_fence,
                              Job.status.in_([JobStatus.RUNNING.value, JobStatus.CANCELLING.value]))
            .values(fence=Job.fence + 1, owner=owner).execution_options(synchronize_session=False)
        ).rowcount == 1
        if not won:
            return None
        job_rows.add_event(session, job_id, EventKind.TAKEN_OVER, actor=owner, detail={"from_fence": seen_fence})
        job_rows.add_event(session, job_id, EventKind.STARTED, actor=owner, detail={"redelivered": True})
    return _owned(job_id, owner)


def _owned(job_id: str, owner: str) -> Job | None:
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None or job.owner != owner:
            return None
        session.expunge(job)
        return job


def finish_ran_through(job_id: str, fence: int | None = None, *, counts: tuple[int, int] | None = None,
                       items: Sequence[StoredItem] = ()) -> JobOutcome:
    """Every item was tried: completed, unless not a single one succeeded. ``counts``: the job's
    ``(total_items, completed_items)`` as the run that owns it (``fence``) knows them, ``items``
    included, so the end is one write and no read.

    ``items``: the run's last items, not yet written, stored in this same transaction before the
    end — fenced like every item write (:class:`~db.jobs.NotOwner`, and nothing of it is committed,
    if the run lost the job). The job's last item write and its end are then one commit, not two.

    Every job that runs through pays this, so the end is a prebuilt statement (as
    :func:`db.jobs.transition` would write it) executed on the session's connection: building the
    UPDATE anew and the Session's execute path cost more CPU than the SQL. On PostgreSQL the end,
    its event and the items are that one statement (:func:`_finish_on_postgres`)."""
    if items and fence is None:
        raise ValueError("a run's items are written under its fence")
    engine = get_engine()
    if engine.dialect.name == "postgresql":
        return _finish_on_postgres(job_id, fence, counts, items)
    with session_scope(writer=bool(items)) as session:
        conn = session.connection()
        status, error, params = _ran_through_params(conn, job_id, fence, counts, items)
        if conn.execute(_ran_through(status, fenced=fence is not None), params).rowcount == 1:
            job_rows.add_events(conn, [job_rows.terminal_event(job_id, status, {"error": error}, at=params["now"])])
            job_rows.insert_items(conn, job_id, items)
            webhooks.after_commit(session, [job_id])
            return JobOutcome(job_id, status, ran=True, error=error)
        # not ended by this call: a finalizer ended it first (the items are kept, as an item write),
        # or another run owns it now (NotOwner, and nothing of this is stored)
        job_rows.record_items(conn, job_id, items, fence=fence or 0)
    return outcome_of(job_id, ran=True)  # a finalizer ended it first: report what the row says


def _finish_on_postgres(job_id: str, fence: int | None, counts: tuple[int, int] | None,
                        items: Sequence[StoredItem]) -> JobOutcome:
    """:func:`finish_ran_through` on PostgreSQL: the end, its event and the items are one statement
    (:func:`_ran_through_with_rows`) on a plain connection in autocommit — one round trip where the
    transaction took five, and no Session (its bookkeeping cost the end a fifth of its CPU). The
    webhook, wanted only with a secret set, is handed a Session of its own after the commit."""
    with statement_writes() as conn:
        status, error, params = _ran_through_params(conn, job_id, fence, counts, items)
        params[job_rows.EVENT_RECORDS] = [job_rows.terminal_event(job_id, status, {"error": error}, at=params["now"])]
        if items:
            params[job_rows.ITEM_RECORDS] = job_rows.item_records(job_id, items)
        ended = conn.execute(_ran_through_with_rows(status, fence is not None, bool(items)), params).rowcount > 0
        if not ended:  # as on SQLite: the items kept as an item write, or NotOwner
            job_rows.record_items(conn, job_id, items, fence=fence or 0)
    if not ended:
        return outcome_of(job_id, ran=True)
    if get_settings().webhook_secret:
        with session_scope() as session:
            webhooks.after_commit(session, [job_id])  # sent as this (empty) session commits
    return JobOutcome(job_id, status, ran=True, error=error)


def _ran_through_params(conn: Connection, job_id: str, fence: int | None, counts: tuple[int, int] | None,
                        items: Sequence[StoredItem]) -> tuple[JobStatus, str | None, dict[str, Any]]:
    """The end's status, error and the parameters of its UPDATE (the counters read if not given)."""
    if counts is None:
        counts = conn.execute(select(Job.total_items, Job.completed_items).where(Job.id == job_id)).one()
    total, completed = counts
    error = f"all {total} items failed" if total and completed == 0 else None
    status = JobStatus.FAILED if error is not None else JobStatus.COMPLETED
    done, failed = job_rows.tally(items)
    # the end's fenced UPDATE counts the items too, and they are stored after it: one statement less
    params = {"job_id": job_id, "run_fence": fence, "done": done, "failed": failed, "now": utcnow(),
              "allowed": [s.value for s in job_rows.ALLOWED_FROM[status]]}
    if error is not None:
        params["error"] = error
    return status, error, params


@cache
def _ran_through(status: JobStatus, fenced: bool) -> Update:
    """The UPDATE that ends a job that ran through, as :func:`db.jobs.transition` writes it (a cancel
    that lost to completion leaves no reason behind; a failure its error), with its last items
    counted; prebuilt once per process for each kind of end."""
    values: dict[str, Any] = {
        "status": status.value, "finished_at": bindparam("now", type_=_jobs.c.finished_at.type),
        "completed_items": _jobs.c.completed_items + bindparam("done", type_=Integer),
        "failed_items": _jobs.c.failed_items + bindparam("failed", type_=Integer),
    }
    if status is JobStatus.COMPLETED:
        values.update(job_rows.COMPLETION_CLEARS)
    else:
        values["error"] = bindparam("error", type_=_jobs.c.error.type)
    owned = [_jobs.c.fence == bindparam("run_fence", type_=Integer)] if fenced else []
    return (update(_jobs).where(_jobs.c.id == bindparam("job_id"), _jobs.c.status.in_(bindparam("allowed", expanding=True)),
                                *owned).values(**values))


@cache
def _ran_through_with_rows(status: JobStatus, fenced: bool, items: bool) -> Insert:
    """PostgreSQL's ran-through end as one statement: ``WITH ended AS (UPDATE … RETURNING id)``, its
    terminal event, and the run's last items, each inserted only if the job ended here. The rowcount
    of the top-level INSERT (kept: ``preserve_rowcount``) says whether it did; that INSERT's table is
    what :mod:`tasks.notify` sees, and the statement binds the job as ``job_id`` as it reads."""
    ended = _ran_through(status, fenced).returning(_jobs.c.id).cte("ended")
    event = job_rows.rows_after(ended, JobEvent.__table__)
    if items:
        statement = job_rows.rows_after(ended, JobItem.__table__).add_cte(ended).add_cte(event.cte("ended_event"))
    else:
        statement = event.add_cte(ended)
    return statement.execution_options(preserve_rowcount=True)


def end_cancelled(job_id: str, error: CancellationError | CancelRequest, *, at_item: int | None,
                  stage: str | None = None, observed_at: datetime | None = None, by: str | None = None,
                  actor: str | None = None, requested_at: datetime | None = None,
                  observed_source: CancellationSource | None = None, fence: int | None = None,
                  requested: CancelRequest | None = None, items: Sequence[StoredItem] = ()) -> bool:
    """The cancel was observed (by the job at a checkpoint, or by a finalizer): record it and end the
    job ``cancelled`` with the winning request's reason. True if this call ended it.

    ``requested``: the request the job's token holds. The token is set before the request writes the
    row, so the job may get here first: it then puts that request on record itself (the row's
    ``cancel_requested_at`` and its ``cancel_requested`` event, exactly once, see
    :func:`record_winner`). A reason the row already holds wins over the token's: the row is the
    arbiter when a first request reached only the database (Redis away).

    ``items``: the run's items that ended and were not written yet, written in this transaction
    (fenced: a run that lost the job has them refused with :class:`~db.jobs.NotOwner`, and ends nothing)."""
    now = observed_at or datetime.now(UTC)
    with session_scope(writer=True) as session:
        row, claim = _held(session, job_id, requested)
        first = (CancelRequest(CancellationReason(row.cancellation_reason), row.cancellation_message,
                               CancellationSource(row.cancellation_source) if row.cancellation_source else None)
                 if row.cancellation_reason else error)
        source = (observed_source or first.source).value if (observed_source or first.source) else None
        detail: dict[str, Any] = {"item": at_item, "stage": stage}
        if by:
            detail["by"] = by
        # the events go with the terminal one, in one INSERT: the winner's record first if this end makes it
        events = [_request_event_row(job_id, requested, "cancelling", won=True)] if claim else []
        events.append(job_rows.event_row(job_id, EventKind.CANCEL_OBSERVED, reason=first.reason.value,
                                         source=source, actor=actor, detail=detail, at=now))
        values: dict[str, Any] = {}
        if claim:
            values["cancel_requested_at"] = requested.at
        if requested_at is not None:
            values["cancel_requested_at"] = requested_at
        # the end's fenced UPDATE counts the items, stored after it (one statement less than an item write)
        won = job_rows.end_with_rows(
            session, job_id, JobStatus.CANCELLED, fence=fence, events=events, items=items,
            **job_rows.cancel_values(first), **values, cancel_observed_at=now, cancelled_at_item=at_item,
            resumable=resumable(row.pipeline, first.reason), **(job_rows.counted_values(items) if items else {}),
        )
        if won:
            webhooks.after_commit(session, [job_id])
            return True
        # the loser changes nothing: no request record (the request writes it), and no observation
        # either — two reapers finalizing one lost run declare it lost once
        session.rollback()
        if items:  # a run whose end lost because another run owns the job now: as an item write would
            if not job_rows.owns(session.connection(), job_id, fence or 0):
                raise job_rows.NotOwner(job_id)
        return False


_HELD = select(Job.pipeline, Job.status, Job.cancel_requested_at, Job.cancellation_reason, Job.cancellation_message,
               Job.cancellation_source)


def _held(session: Session, job_id: str, requested: CancelRequest | None) -> tuple[Row, bool]:
    """The row's pipeline and the request it holds, read under its write lock (what the end decides
    from them stands until it commits), and whether this end puts ``requested`` on record (nobody
    has: ``cancel_requested_at`` is empty and the job open — then the end's UPDATE stamps it).

    PostgreSQL: one ``SELECT … FOR NO KEY UPDATE`` (the lock an UPDATE takes), a round trip less than
    a claim's UPDATE and a read. SQLite: the claim's conditional UPDATE first, then the read: its
    write lock must come before the read, as a read that writes later may find its snapshot stale
    (``SQLITE_BUSY_SNAPSHOT``, which no busy handler waits out)."""
    query = _HELD.where(Job.id == job_id)
    if session.get_bind().dialect.name == "postgresql":
        row = session.execute(query.with_for_update(key_share=True)).one()
        return row, requested is not None and row.cancel_requested_at is None and not JobStatus(row.status).is_terminal
    claimed = requested is not None and _claim(session, job_id, requested, only_open=True)
    return session.execute(query).one(), claimed


def record_winner(session: Session, job_id: str, winner: CancelRequest, status: str, *,
                  only_open: bool = False) -> bool:
    """Put the winning request on record if nobody has yet: stamp ``cancel_requested_at`` (only while
    it is empty — one conditional UPDATE, so of the request and the worker racing to it, exactly one
    wins) and add the winner's ``cancel_requested`` event, in the caller's transaction. ``only_open``:
    only while the job is not terminal. True if this call recorded it."""
    claimed = _claim(session, job_id, winner, only_open=only_open)
    if claimed:
        add_request_event(session, job_id, winner, status, won=True)
    return claimed


def _claim(session: Session, job_id: str, winner: CancelRequest, *, only_open: bool) -> bool:
    """Stamp ``cancel_requested_at`` with the winner's if it is empty (:func:`record_winner`)."""
    allowed = [s.value for s in JobStatus if not s.is_terminal] if only_open else [JobStatus.CANCELLED.value]
    return session.execute(
        update(Job).where(Job.id == job_id, Job.cancel_requested_at.is_(None), Job.status.in_(allowed))
        .values(cancel_requested_at=winner.at).execution_options(synchronize_session=False)
    ).rowcount == 1


def add_request_event(session: Session, job_id: str, request: CancelRequest, status: str, *, won: bool) -> None:
    """The ``cancel_requested`` event of one request, winner or loser."""
    job_rows.add_events(session, [_request_event_row(job_id, request, status, won=won)])


def _request_event_row(job_id: str, request: CancelRequest, status: str, *, won: bool) -> dict[str, Any]:
    return job_rows.event_row(
        job_id, EventKind.CANCEL_REQUESTED, reason=request.reason.value,
        source=request.source.value if request.source else None, actor=request.actor,
        detail={"message": request.message, "status": status, "won": won}, at=request.at,
    )


def end_failed(job_id: str, error: str, fence: int | None = None, only_from: JobStatus | None = None) -> bool:
    """``only_from``: as :func:`db.jobs.transition` (a finalizer fails only a row still ``running``:
    one a cancel moved to ``cancelling`` meanwhile ends cancelled instead)."""
    with session_scope() as session:
        return _end(session, job_id, JobStatus.FAILED, fence=fence, error=error, only_from=only_from)


def requeue(job_id: str, source: CancellationSource, actor: str | None, detail: dict[str, Any]) -> bool:
    """Back to ``pending``: the job's process was lost and the broker redelivers its message."""
    with session_scope() as session:
        if job_rows.transition(session, job_id, JobStatus.PENDING):
            job_rows.add_event(session, job_id, EventKind.REQUEUED, source=source.value, actor=actor, detail=detail)
            return True
    return False


def requested_cancels(job_ids: list[str], session: Session | None = None,
                      status: JobStatus = JobStatus.CANCELLING) -> dict[str, CancelRequest]:
    """The winning cancel requests the job rows hold (status ``cancelling``) — the durable copy of a
    token, and the arbiter of which request came first."""
    query = (select(Job.id, Job.cancellation_reason, Job.cancellation_message, Job.cancellation_source,
                    Job.cancel_requested_at)
             .where(Job.id.in_(job_ids), Job.status == status.value))
    if session is None:
        with session_scope() as own:
            rows = own.execute(query).all()
    else:
        rows = session.execute(query).all()
    return {
        job_id: CancelRequest(CancellationReason(reason), message, CancellationSource(source) if source else None,
                              at or datetime.now(UTC))
        for job_id, reason, message, source, at in rows if reason
    }


def mark_running_requested(job_id: str, winner: CancelRequest, losers: Sequence[CancelRequest] = ()) -> bool:
    """Running → cancelling with ``winner`` on record (its ``cancel_requested_at`` and event) and
    ``losers``' events, committed; False, and nothing written, if the job is not running (then
    :func:`mark_requested` finds out what it is). The common case of a cancel, for a running job.

    On PostgreSQL one statement committed on its own (:func:`db.jobs.moved_with_events`): one round
    trip where a transaction took four, and the job's row lock — which the worker's end of the job
    waits for — held for that statement only, not over the event's INSERT and the COMMIT too."""
    events = [_request_event_row(job_id, winner, JobStatus.CANCELLING.value, won=True),
              *(_request_event_row(job_id, loser, JobStatus.CANCELLING.value, won=False) for loser in losers)]
    values = {**job_rows.cancel_values(winner), "cancel_requested_at": winner.at}
    engine = get_engine()
    if engine.dialect.name != "postgresql":
        with session_scope(writer=True) as session:
            return job_rows.transition(session, job_id, JobStatus.CANCELLING, events=events, **values)
    with statement_writes() as conn:
        statement, params = job_rows.moved_with_events(JobStatus.CANCELLING, events, **values)
        return conn.execute(statement, {**params, "job_id": job_id}).rowcount > 0


def mark_requested(session: Session, job_id: str, request: CancelRequest) -> tuple[JobStatus, CancelRequest, bool]:
    """Queued → cancelled at once; running → cancelling, with ``request`` as the winner (the token's
    winner when Redis decided, else this request). Returns the status, the request the row holds, and
    whether this call moved the row (then it also put the winner on record: its
    ``cancel_requested_at`` and, for the caller to add, its event — see :func:`record_winner`).

    The token may be set before this runs, so the job may already have ended ``cancelled`` by it: that
    is this cancel taking effect, not a job that was over (``cancelled``, not moved; if the job got
    there first without a record, this call records the winner). Retries if a worker moves the row
    meanwhile."""
    values = {**job_rows.cancel_values(request), "cancel_requested_at": request.at}
    # the common case first, without reading the row: a running job
    if job_rows.transition(session, job_id, JobStatus.CANCELLING, **values):
        return JobStatus.CANCELLING, request, True
    for _ in range(5):
        row = session.execute(select(Job.status, Job.pipeline).where(Job.id == job_id)).one_or_none()
        if row is None:
            raise JobNotFound(job_id)
        status = JobStatus(row.status)
        if status is JobStatus.CANCELLED:
            held = requested_cancels([job_id], session, status=JobStatus.CANCELLED).get(job_id, request)
            return status, held, False
        if status.is_terminal:
            raise JobAlreadyTerminal(job_id, status.value)
        if status is JobStatus.CANCELLING:
            return status, requested_cancels([job_id], session).get(job_id, request), False
        if status is JobStatus.PENDING and _end(
            session, job_id, JobStatus.CANCELLED, only_from=JobStatus.PENDING, cancelled_at_item=0,
            resumable=resumable(row.pipeline, request.reason), **values,
        ):
            return JobStatus.CANCELLED, request, True
        if status is JobStatus.RUNNING and job_rows.transition(session, job_id, JobStatus.CANCELLING, **values):
            return JobStatus.CANCELLING, request, True
    raise JobAlreadyTerminal(job_id, "changing too fast to cancel")


def cancel_queued(session: Session, job_ids: list[str], request: CancelRequest,
                  pipelines: Collection[str] | None = None, *, events: Sequence[EventKind] = (),
                  actor: str | None = None, detail: dict[str, Any] | None = None) -> list[str]:
    """End many queued jobs ``cancelled`` in one conditional UPDATE (only rows still ``pending``
    change, so a job a worker just started is left to the per-job path); returns the ended ids.
    ``events``: the kinds of event each ended job gets, with the request's fields, ``actor`` and
    ``detail`` (:func:`db.jobs.changed_with_events`: on PostgreSQL in the same statement).

    Whether a stop is resumable is each pipeline's policy: a ``CASE`` on the pipeline column, in the
    same statement. Core statements on the table: the ORM's bulk UPDATE path costs more than the SQL.
    ``pipelines``: the jobs' pipelines if the caller read them already (else one more SELECT)."""
    jobs = Job.__table__
    if pipelines is None:
        pipelines = session.scalars(select(jobs.c.pipeline).where(job_rows.ids_in(session, jobs.c.id, job_ids))
                                    .distinct()).all()
    policy = {pipeline: resumable(pipeline, request.reason) for pipeline in pipelines}
    stop_is_resumable = (next(iter(policy.values()), False) if len(set(policy.values())) <= 1
                         else case(policy, value=jobs.c.pipeline, else_=False))
    values = {**job_rows.cancel_values(request), "cancel_requested_at": request.at, "cancelled_at_item": 0,
              "status": JobStatus.CANCELLED.value, "finished_at": request.at, "resumable": stop_is_resumable}
    statement = (update(jobs).where(job_rows.ids_in(session, jobs.c.id, job_ids, jobs.c.status == JobStatus.PENDING.value))
                 .values(**values).returning(jobs.c.id))
    ended = job_rows.changed_with_events(
        session, statement, events, reason=request.reason.value,
        source=request.source.value if request.source else None, actor=actor, detail=detail, at=request.at)
    webhooks.after_commit(session, ended)
    return ended


def _end(session: Session, job_id: str, to: JobStatus, **kwargs: Any) -> bool:
    """A terminal transition; if it won, the job's webhook goes out once this transaction commits."""
    won = job_rows.transition(session, job_id, to, **kwargs)
    if won:
        webhooks.after_commit(session, [job_id])
    return won
