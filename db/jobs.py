"""How a job's rows change. The one place that decides status transitions.

Every status change is a conditional ``UPDATE ... WHERE status IN (allowed)``: two writers racing
(a cancel and the last item completing, the API and a worker) both try, exactly one row changes, and
the loser sees ``False`` and changes nothing else. A terminal status is never left.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from operator import itemgetter
from typing import Any, Protocol

from sqlalchemy import (
    JSON,
    ColumnElement,
    Connection,
    Integer,
    Text,
    and_,
    any_,
    bindparam,
    case,
    cast,
    delete,
    func,
    insert,
    literal,
    select,
    text,
    true,
    union_all,
    update,
)
from sqlalchemy import column as sql_column
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import Insert, Update
from sqlalchemy.sql.selectable import TableValuedAlias
from sqlalchemy.types import TypeDecorator

from db.models import Job, JobEvent, JobItem, JobParent, JobTag, utcnow
from db.vocabulary import EventKind, ItemStatus, JobStatus

P, R, C = JobStatus.PENDING, JobStatus.RUNNING, JobStatus.CANCELLING

#: For each target status, the statuses it may be reached from.
ALLOWED_FROM: dict[JobStatus, frozenset[JobStatus]] = {
    # back to the queue: its worker was lost and Celery redelivers the message (acks_late)
    JobStatus.PENDING: frozenset({R}),
    JobStatus.RUNNING: frozenset({P}),
    JobStatus.CANCELLING: frozenset({R}),
    JobStatus.CANCELLED: frozenset({P, R, C}),
    # a cancel requested during the last stage of the last item loses to completion: all work is done
    JobStatus.COMPLETED: frozenset({R, C}),
    JobStatus.FAILED: frozenset({P, R, C}),
}

_TERMINAL_EVENT = {
    JobStatus.CANCELLED: EventKind.CANCELLED,
    JobStatus.COMPLETED: EventKind.COMPLETED,
    JobStatus.FAILED: EventKind.FAILED,
}


def transition(session: Session, job_id: str, to: JobStatus, *, only_from: JobStatus | None = None,
               fence: int | None = None, raise_fence: bool = False, events: Sequence[dict[str, Any]] = (),
               **values: Any) -> bool:
    """Move a job to ``to`` if its current status allows it; True if this call won.

    ``only_from`` narrows the allowed statuses to one the caller has just seen (a cancel meant for a
    queued job must not end one that started meanwhile); ``fence``: only if the caller's run still
    owns the job; ``raise_fence``: a run taking the job raises it in the same UPDATE. ``values`` are
    written in the same UPDATE; ``events`` (:func:`event_row`) are inserted if it won, before the
    terminal one and in the same INSERT (a round trip each on PostgreSQL).
    Reaching a terminal status stamps ``finished_at`` and records the matching event, in the
    caller's transaction. A Core UPDATE on the table: the ORM's bulk-update path costs more than the SQL.
    """
    allowed = ALLOWED_FROM[to] if only_from is None else ALLOWED_FROM[to] & {only_from}
    if to.is_terminal:
        values.setdefault("finished_at", utcnow())
    if to is JobStatus.COMPLETED:
        values.update(COMPLETION_CLEARS)
    owned = [_jobs.c.fence == fence] if fence is not None else []
    if raise_fence:
        values["fence"] = _jobs.c.fence + 1
    result = session.execute(
        update(_jobs)
        .where(_jobs.c.id == job_id, _jobs.c.status.in_([s.value for s in allowed]), *owned)
        .values(status=to.value, **values)
    )
    won = result.rowcount == 1
    if won:
        add_events(session, [*events, terminal_event(job_id, to, values)] if to.is_terminal else list(events))
    return won


#: What a job's completion writes over: a cancel that lost to completion leaves no reason behind.
COMPLETION_CLEARS: dict[str, Any] = {"cancellation_reason": None, "cancellation_message": None,
                                     "cancellation_source": None}


def terminal_event(job_id: str, to: JobStatus, values: dict[str, Any], at: datetime | None = None) -> dict[str, Any]:
    """The event a terminal transition to ``to`` records (:func:`event_row`), from the ``values`` it
    wrote: a cancel's reason and source, a failure's error."""
    return event_row(job_id, _TERMINAL_EVENT[to], reason=values.get("cancellation_reason"),
                     source=values.get("cancellation_source"),
                     detail={"error": values["error"]} if values.get("error") else None, at=at)


def end_with_rows(session: Session, job_id: str, to: JobStatus, *, fence: int | None,
                  events: Sequence[dict[str, Any]] = (), items: Sequence[StoredItem] = (), **values: Any) -> bool:
    """A terminal :func:`transition` with its ``events`` and the run's last ``items`` (which ``values``
    count, :func:`counted_values`), inserted only if it won; True if it did.

    On PostgreSQL one statement (a data-modifying ``WITH``: the UPDATE ``… RETURNING`` feeds both
    INSERTs): one round trip where the UPDATE, the events' INSERT and the items' took three, and the
    end of a cancelled job waits on each. Elsewhere those three statements."""
    if _dialect_name(session) != "postgresql":
        won = transition(session, job_id, to, fence=fence, events=events, **values)
        if won:
            insert_items(session.connection(), job_id, items)
        return won
    if not to.is_terminal:
        raise ValueError("not a terminal status: transition()")
    values.setdefault("finished_at", utcnow())
    owned = [_jobs.c.fence == fence] if fence is not None else []
    ended = (update(_jobs).where(_jobs.c.id == bindparam("job_id"), _jobs.c.status.in_([s.value for s in ALLOWED_FROM[to]]),
                                 *owned).values(status=to.value, **values).returning(_jobs.c.id).cte("ended"))
    statement = rows_after(ended, JobEvent.__table__)
    # the job's id is bound as `job_id` (what tasks.notify reads)
    params: dict[str, Any] = {"job_id": job_id, EVENT_RECORDS: [*events, terminal_event(job_id, to, values)]}
    if items:
        statement = rows_after(ended, JobItem.__table__).add_cte(statement.cte("events"))
        params[ITEM_RECORDS] = item_records(job_id, items)
    # the rowcount of an INSERT is kept only if asked
    return session.execute(statement.add_cte(ended).execution_options(preserve_rowcount=True), params).rowcount > 0


def recordset(columns: Sequence[Any], name: str) -> TableValuedAlias:
    """The rows of the JSON array bound as ``name`` as a table of ``columns`` (each read as its
    column's type): ``json_to_recordset(:name) AS name(col type, …)`` — PostgreSQL's multi-row
    insert from one parameter, of one shape for any number of rows (see :func:`insert_rows`)."""
    return (func.json_to_recordset(cast(bindparam(name, type_=_Records()), JSON))
            .table_valued(*(sql_column(c.name, c.type) for c in columns))
            .render_derived(name=name, with_types=True))


class _Records(TypeDecorator):
    """Rows (dicts) bound as one JSON text, times as ISO 8601 (with their offset): serialized as the
    statement runs, in one ``json.dumps``, so hooks (:mod:`tasks.notify`) still see the rows."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> str:
        return json.dumps(value, default=_iso)


def _iso(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


#: The parameter :func:`insert_rows` binds its rows to on PostgreSQL (what :mod:`tasks.notify` reads
#: the job ids of an INSERT from, when its parameters have no ``job_id``).
ROWS = "rows"


def insert_rows(session: Session | Connection, table: Any, rows: Sequence[dict[str, Any]]) -> None:
    """Many rows of ``table`` (each dict with the same columns) in one statement. psycopg's
    ``executemany`` sends PostgreSQL a statement per row, pipelined — 30,000 for a batch submit of
    10,000 jobs (the jobs, their tags, their events), each parsed, planned and executed on its own,
    and each row's values dumped one by one on this side — so there one ``INSERT … SELECT`` reads
    them all from one JSON array (:func:`recordset`). SQLite, in this process, runs an
    ``executemany`` row by row at little cost each."""
    if not rows:
        return
    if _dialect_name(session) != "postgresql":
        session.execute(insert(table), list(rows))
        return
    session.execute(_insert_rows(table, tuple(rows[0])), {ROWS: rows})


def _dialect_name(session: Session | Connection) -> str:
    return (session.get_bind() if isinstance(session, Session) else session).dialect.name


@lru_cache(maxsize=32)
def _insert_rows(table: Any, columns: tuple[str, ...]) -> Insert:
    records = recordset([table.c[name] for name in columns], ROWS)
    return insert(table).from_select(list(columns), select(*records.c))


#: The parameters :func:`rows_after` binds the rows of ``job_events`` and of ``job_items`` to.
EVENT_RECORDS, ITEM_RECORDS = "event_records", "item_records"
_RECORDS_OF = {JobEvent.__tablename__: EVENT_RECORDS, JobItem.__tablename__: ITEM_RECORDS}


def rows_after(rows: Any, table: Any) -> Insert:
    """``INSERT … SELECT`` into ``table`` (``job_events`` or ``job_items``) of the rows in the JSON
    array bound as :data:`EVENT_RECORDS` / :data:`ITEM_RECORDS` (:func:`recordset`), each with the
    ``job_id`` of each row ``rows`` (a data-modifying CTE returning ``id``) returns — so none if it
    returns none. One statement of one shape for any number of rows: a ``UNION ALL`` of a ``SELECT``
    per row took SQLAlchemy 35 ms to compile for 50 items and 195 ms for 250 (an async stage's
    in-flight items, all interrupted by the cancel), and PostgreSQL a bound parameter per value; as
    one JSON parameter, items cost half the CPU of a parameter array per column (which psycopg dumps
    value by value). The caller adds ``rows`` to the statement (``add_cte``: PostgreSQL takes a
    data-modifying ``WITH`` only at the top)."""
    columns = [c for c in table.c if c.name not in ("id", "job_id")]
    records = recordset(columns, _RECORDS_OF[table.name])
    return insert(table).from_select(["job_id", *(c.name for c in columns)],
                                     select(rows.c.id, *records.c).select_from(rows).join(records, true()))


def moved_with_events(to: JobStatus, events: Sequence[dict[str, Any]], **values: Any) -> tuple[Insert, dict[str, Any]]:
    """:func:`transition` to a status that is not terminal and its ``events`` (:func:`event_row`) as
    one statement, for PostgreSQL (a data-modifying ``WITH``): the job's UPDATE ``… RETURNING`` feeds
    the events' ``INSERT … SELECT``, so they are inserted only if it moved. Its rowcount is the events
    inserted (0: it did not move). Returns the statement and its parameters; the job's id is to be
    added as ``job_id`` (what :mod:`tasks.notify` reads). Committed on its own, it holds the job's
    row lock for that one statement."""
    if to.is_terminal:
        raise ValueError("a terminal transition stamps its end and event: transition()")
    params: dict[str, Any] = {f"set_{column}": value for column, value in values.items()}
    params[EVENT_RECORDS] = list(events)
    return _moved_with_events(to, tuple(values)), params


@lru_cache(maxsize=16)
def _moved_with_events(to: JobStatus, columns: tuple[str, ...]) -> Insert:
    """Built once per shape, with bound parameters: building and keying the statement anew cost the
    request ~0.4 ms of CPU."""
    moved = (update(_jobs).where(_jobs.c.id == bindparam("job_id"), _jobs.c.status.in_([s.value for s in ALLOWED_FROM[to]]))
             .values(status=to.value, **{c: bindparam(f"set_{c}", type_=_jobs.c[c].type) for c in columns})
             .returning(_jobs.c.id).cte("moved"))
    return (rows_after(moved, JobEvent.__table__).add_cte(moved)
            .execution_options(preserve_rowcount=True))  # an INSERT's rowcount is kept only if asked


def cancel_values(request: Any) -> dict[str, Any]:
    """The job columns a cancel request fills in (its ``reason``, ``message`` and ``source``)."""
    return {
        "cancellation_reason": request.reason.value,
        "cancellation_message": request.message,
        "cancellation_source": request.source.value if request.source else None,
    }


def add_event(
    session: Session | Connection,
    job_id: str,
    kind: EventKind,
    *,
    reason: str | None = None,
    source: str | None = None,
    actor: str | None = None,
    detail: dict[str, Any] | None = None,
    at: datetime | None = None,
) -> None:
    """One event, inserted at once in the caller's transaction — a Core INSERT, not an ORM object:
    the unit of work's flush cost several times the SQL on the terminal-row path, and nothing here
    needs the object back. (Rows go as parameters, which is what :mod:`tasks.notify` reads.) A plain
    connection does as well as a session: the job's start writes its event on one."""
    session.execute(_INSERT_EVENT, event_row(job_id, kind, reason=reason, source=source, actor=actor,
                                             detail=detail, at=at))


def event_row(job_id: str, kind: EventKind, *, reason: str | None = None, source: str | None = None,
              actor: str | None = None, detail: dict[str, Any] | None = None,
              at: datetime | None = None) -> dict[str, Any]:
    """The parameters of one event, for :func:`add_events` (several events, one round trip)."""
    return {"job_id": job_id, "kind": kind.value, "reason": reason, "source": source, "actor": actor,
            "detail": detail, "at": at or utcnow()}


def add_events(session: Session | Connection, rows: list[dict[str, Any]]) -> None:
    """Many events in one INSERT (bulk cancel, batch submit): the table's, not the ORM entity's — the
    ORM's bulk path costs as much again per row as the SQL, and nothing here needs the objects."""
    insert_rows(session, JobEvent.__table__, rows)


_INSERT_EVENT = insert(JobEvent.__table__)


def ids_in(session: Session, column: ColumnElement[str], ids: list[str], *also: ColumnElement[bool]) -> ColumnElement[bool]:
    """``column IN ids`` (and ``also``, checked on each row the ids found: :func:`recheck`), the rows
    looked up by ``column``, with the ids as one parameter, a JSON array (:func:`_listed`), instead
    of a bound parameter per id: for a thousand ids, SQLAlchemy's coercing and rendering them one by
    one cost the bulk cancel as much CPU as SQLite's own work on the rows. On PostgreSQL the array
    is made of them once (``= ANY (ARRAY(…))``, an init plan) and each id looked up in ``column``'s
    index."""
    if _dialect_name(session) == "postgresql":
        return and_(column == any_(func.array(select(_listed(session, ids).c.value).scalar_subquery())),
                    *recheck(session, *also))
    return and_(column.in_(select(_listed(session, ids).c.value)), *recheck(session, *also))


def recheck(session: Session | Connection, *conditions: ColumnElement[bool]) -> list[ColumnElement[bool]]:
    """``conditions`` as checks of rows found some other way (by their ids, a tag, a parent), which
    the planner can't take to find them by.

    The planner's statistics are of the table as it was when last analyzed, and most of the time
    most jobs are over: ``status = 'pending'`` looks like a handful of rows. A bulk cancel of
    thousands of jobs queued since then was planned from that — PostgreSQL read every pending job
    through the status index for each thousand ids, and matched a tag's jobs by rescanning the
    whole tag for each pending job (10,000 tagged jobs after 100,000 that ended: 12.9 s, and
    207 ms per thousand ids instead of ~30). On PostgreSQL each condition goes in ``IS TRUE``,
    which no index serves; on SQLite (no statistics: its planner guesses) in ``likely()``, so it
    doesn't take an equality on an indexed column for a selective one either."""
    if _dialect_name(session) == "postgresql":
        return [condition.is_(true()) for condition in conditions]
    return [func.likely(condition) for condition in conditions]


def _listed(session: Session, ids: list[str]) -> TableValuedAlias:
    """``ids`` as a one-column table (``value``) from one JSON array parameter: ``json_each`` on
    SQLite, ``json_array_elements_text`` on PostgreSQL. (A list parameter there is an array that
    psycopg dumps id by id in Python: 2.1 ms per thousand, against 0.2 for ``json.dumps``.)"""
    ids_json = bindparam(None, json.dumps(ids))
    if _dialect_name(session) == "postgresql":
        return func.json_array_elements_text(cast(ids_json, JSON)).table_valued("value").render_derived()
    return func.json_each(ids_json).table_valued("value")


def by_index(session: Session) -> None:
    """Have this transaction's statements find rows by their ids' index on PostgreSQL: for a
    thousand ids in a table of 100,000 jobs its cost model takes a sequential scan of the whole
    table (~40 ms, cached) over a thousand index probes (~2 ms), or a bitmap of every pending job
    (``status = 'pending'``, then the ids as a filter: 30,000 rows visited for 1,000) — per batch
    of a bulk cancel, either is quadratic in its size. One round trip for both settings."""
    if _dialect_name(session) == "postgresql":
        session.execute(_BY_INDEX)


_BY_INDEX = text("SELECT set_config('enable_seqscan', 'off', true), set_config('enable_bitmapscan', 'off', true)")


def add_events_for(session: Session, job_ids: list[str], kinds: Sequence[EventKind], *, reason: str | None = None,
                   source: str | None = None, actor: str | None = None, detail: dict[str, Any] | None = None,
                   at: datetime | None = None) -> None:
    """One event of each of ``kinds`` per job, all with the same fields, in one ``INSERT … SELECT``
    (bulk cancel): the job ids go once, not a parameter row per event — SQLAlchemy's per-row
    parameter processing and one ``detail`` JSON encoding per row cost more than the insert itself.
    Each job's events follow one another in ``kinds``' order, jobs in id order.

    The rows come from the ids themselves, not from ``jobs``: looking each job up again (a
    thousand index probes and a sort, per batch) bought nothing the events' foreign key doesn't
    check anyway — an id of no job still fails the insert."""
    if not job_ids or not kinds:
        return
    listed = _listed(session, sorted(set(job_ids)))
    session.execute(_events_of(listed.c.value, kinds, reason, source, actor, detail, at))


def changed_with_events(session: Session, statement: Update, kinds: Sequence[EventKind], *,
                        reason: str | None = None, source: str | None = None, actor: str | None = None,
                        detail: dict[str, Any] | None = None, at: datetime | None = None) -> list[str]:
    """Run ``statement`` (an UPDATE of ``jobs`` … ``RETURNING`` the ids it changed) and record one
    event of each of ``kinds`` per job it changed (as :func:`add_events_for`); returns those ids.

    On PostgreSQL one statement (a data-modifying ``WITH``), so the server does a bulk cancel's
    batch in one go: as two, its backend waited between them on this process (the ids back, the
    next statement out) while the other batches' threads held the GIL, and each batch sent its
    thousand ids twice. SQLite: the UPDATE, then :func:`add_events_for`."""
    if kinds and _dialect_name(session) == "postgresql":
        changed_rows = statement.cte("changed")
        events = _events_of(changed_rows.c.id, kinds, reason, source, actor, detail, at).cte("events")
        return list(session.scalars(select(changed_rows.c.id).add_cte(events)))
    changed = list(session.scalars(statement))
    add_events_for(session, changed, kinds, reason=reason, source=source, actor=actor, detail=detail, at=at)
    return changed


def _events_of(job_id: ColumnElement[str], kinds: Sequence[EventKind], reason: str | None, source: str | None,
               actor: str | None, detail: dict[str, Any] | None, at: datetime | None) -> Insert:
    """The ``INSERT … SELECT`` of one event of each of ``kinds`` per ``job_id`` (a column of the rows
    to select from), all with the same fields, in id order and then ``kinds``' order."""
    events = JobEvent.__table__
    kind = union_all(*(select(literal(k.value, events.c.kind.type).label("kind"), literal(n).label("n"))
                       for n, k in enumerate(kinds))).subquery("kinds")
    rows = (select(job_id, kind.c.kind, literal(reason, events.c.reason.type),
                   literal(source, events.c.source.type), literal(actor, events.c.actor.type),
                   literal(detail, events.c.detail.type), literal(at or utcnow(), events.c.at.type))
            .select_from(job_id.table.join(kind, true())).order_by(job_id, kind.c.n))
    return insert(events).from_select(["job_id", "kind", "reason", "source", "actor", "detail", "at"], rows)


_jobs, _items = Job.__table__, JobItem.__table__
_INSERT_ITEM = insert(_items)
#: The first statement of every item write: add a batch's items to the job's counters *if this run
#: still owns the job* (on PostgreSQL it also locks the row, so a takeover and an item write are
#: serialized). A batch of interrupted items only adds zeros: the fence check is the point.
_BUMP = (update(_jobs)
         .where((_jobs.c.id == bindparam("job_id")) & (_jobs.c.fence == bindparam("run_fence")))
         .values(completed_items=_jobs.c.completed_items + bindparam("done", type_=Integer),
                 failed_items=_jobs.c.failed_items + bindparam("failed", type_=Integer)))


#: The execution option of a statement whose inserted rows sit inside a data-modifying ``WITH``,
#: where :mod:`tasks.notify`'s hook (it reads a top-level INSERT's parameters) can't see them: the
#: table they go to. The statement binds the job's id as ``job_id``.
INSERTS_INTO = "andon_inserts_into"

#: An item write on PostgreSQL: :data:`_BUMP` and the items' INSERT as one statement (the INSERT is
#: empty if the run lost the job). Its rowcount is the items stored, kept only if asked.
_BUMPED = _BUMP.returning(_jobs.c.id).cte("bumped")
_RECORD_ITEMS = rows_after(_BUMPED, JobItem.__table__).add_cte(_BUMPED).execution_options(preserve_rowcount=True)


class NotOwner(Exception):
    """The run writing an item no longer owns the job (another delivery took it over)."""


class StoredItem(Protocol):
    """What :func:`record_items` reads of an item that ended (the engine's ``ItemRecord`` is one)."""

    index: int
    stage: str
    status: ItemStatus
    result: Any
    error: str | None
    started_at: datetime | None
    finished_at: datetime | None
    retries: int
    usage: dict[str, Any] | None


@dataclass(frozen=True)
class ItemRow:
    """One item that ended, for callers without an ``ItemRecord`` (:func:`record_item`)."""

    index: int
    stage: str
    status: ItemStatus
    result: Any = None
    error: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    retries: int = 0
    usage: dict[str, Any] | None = None


def record_items(conn: Connection, job_id: str, items: Sequence[StoredItem], *, fence: int = 0) -> None:
    """Store items that ended and add them to the job's counters in the caller's transaction
    (interrupted items count as neither done nor failed) — only while run ``fence`` owns the job,
    else :class:`NotOwner` and nothing of the batch is stored (the caller's transaction rolls back).

    This is the per-item hot path, so it takes a plain connection (``db.session.transaction``) and
    executes two prebuilt Core statements whatever the batch's size: one counter UPDATE, one
    multi-row INSERT. An ORM session costs several times the SQL itself.
    """
    if not items:
        return
    done, failed = tally(items)
    if conn.dialect.name == "postgresql":  # one statement: on an autocommit connection, one round trip
        params = {"job_id": job_id, "run_fence": fence, "done": done, "failed": failed,
                  ITEM_RECORDS: item_records(job_id, items)}
        if conn.execute(_RECORD_ITEMS, params).rowcount == 0:
            raise NotOwner(job_id)
        return
    if conn.execute(_BUMP, {"job_id": job_id, "run_fence": fence, "done": done, "failed": failed}).rowcount != 1:
        raise NotOwner(job_id)
    insert_items(conn, job_id, items)


def owns(conn: Connection, job_id: str, fence: int) -> bool:
    """Does run ``fence`` still own the job? (A read; the writes check it in their UPDATEs.)"""
    return conn.scalar(select(_jobs.c.fence).where(_jobs.c.id == job_id)) == fence


def counted_values(items: Sequence[StoredItem]) -> dict[str, Any]:
    """The counter columns that add ``items`` to the job, for a fenced UPDATE the caller makes anyway
    (a job's end): then :func:`insert_items` stores them, and the end costs one statement less."""
    done, failed = tally(items)
    return {"completed_items": _jobs.c.completed_items + done, "failed_items": _jobs.c.failed_items + failed}


def tally(items: Sequence[StoredItem]) -> tuple[int, int]:
    """How many of ``items`` are done, and how many failed (interrupted ones are neither)."""
    return (sum(1 for item in items if item.status is ItemStatus.DONE),
            sum(1 for item in items if item.status is ItemStatus.FAILED))


def insert_items(conn: Connection, job_id: str, items: Sequence[StoredItem]) -> None:
    """Store items, and nothing else: only after a fenced UPDATE that counted them in this transaction
    (:func:`record_items`' counter update, or a job's end with :func:`counted_values`)."""
    if not items:
        return
    conn.execute(_INSERT_ITEM, item_records(job_id, items))


def item_records(job_id: str, items: Sequence[StoredItem]) -> list[dict[str, Any]]:
    """The rows of ``items`` in ``job_items`` (what :func:`insert_items` and :func:`rows_after` write)."""
    now = utcnow()
    return [_item_row(job_id, item, now) for item in items]


_NO_USAGE: dict[str, Any] = {}


def _item_row(job_id: str, item: StoredItem, now: datetime) -> dict[str, Any]:
    usage = item.usage or _NO_USAGE  # a property that builds a dict: read once, not once per column
    return {"job_id": job_id, "index": item.index, "stage": item.stage, "status": item.status.value,
            "result": item.result, "error": item.error, "started_at": item.started_at,
            "finished_at": item.finished_at or now, "retries": item.retries,
            "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
            "usage_cut_short": usage.get("cut_short"), "usage_estimated": usage.get("estimated")}


def record_item(conn: Connection, job_id: str, index: int, stage: str, status: ItemStatus, *,
                fence: int = 0, **fields: Any) -> None:
    """One item: :func:`record_items` with a batch of one (``fields`` as :class:`ItemRow`'s)."""
    record_items(conn, job_id, [ItemRow(index, stage, status, **fields)], fence=fence)


def copy_done_items(session: Session, from_job: str, to_job: str) -> int:
    """Give ``to_job`` every finished item of ``from_job`` (a resumed job keeps what was paid for)."""
    done = list(session.scalars(
        select(JobItem).where(JobItem.job_id == from_job, JobItem.status == ItemStatus.DONE.value)
    ))
    for item in done:
        session.add(JobItem(job_id=to_job, index=item.index, stage=item.stage, status=item.status,
                            result=item.result, started_at=item.started_at, finished_at=item.finished_at))
    session.execute(update(Job).where(Job.id == to_job).values(completed_items=len(done))
                    .execution_options(synchronize_session=False))
    return len(done)


def children_of(job_id: str) -> ColumnElement[bool]:
    """Jobs that wait for ``job_id``: its children by ``parent_job_id``, and a chord body by ``job_parents``.

    One list of ids from both, each read through its own index: an ``OR`` of the two had
    PostgreSQL's planner scan every job (it can't join an index scan with a subquery's hash in an
    ``OR``) — at every job's end, which looks for children to settle."""
    return Job.id.in_(union_all(select(_child.c.id).where(_child.c.parent_job_id == job_id),
                                select(JobParent.job_id).where(JobParent.parent_id == job_id)))


#: ``jobs`` again, as the children: the same table in the subquery would be correlated to the outer one
_child = Job.__table__.alias("child")


def tagged(tag: str) -> ColumnElement[bool]:
    """Jobs submitted with ``tag``."""
    return Job.id.in_(select(JobTag.job_id).where(JobTag.tag == tag))


def finished_indexes(session: Session, job_id: str) -> set[int]:
    """Items this job has tried (done or failed); interrupted ones are not."""
    return set(session.scalars(select(JobItem.index).where(
        JobItem.job_id == job_id, JobItem.status != ItemStatus.INTERRUPTED.value)))


def create_job(
    session: Session,
    job_id: str,
    inputs: list[Any],
    options: dict[str, Any],
    *,
    pipeline: str = "documents",
    queue: str | None = None,
    deadline_s: float | None = None,
    parent_job_id: str | None = None,
    resumed_from: str | None = None,
    deferred: bool = False,
    tenant: str | None = None,
    tags: list[str] | tuple[str, ...] = (),
    waits_for: list[str] | tuple[str, ...] = (),
    actor: str | None = None,
    supersede_key: str | None = None,
    callback_url: str | None = None,
) -> Job:
    """A new ``pending`` job row and its ``submitted`` event. ``waits_for``: the jobs it waits for
    besides ``parent_job_id`` (a chord's body waits for every header job)."""
    now = utcnow()
    job = Job(
        id=job_id,
        status=JobStatus.PENDING.value,
        pipeline=pipeline,
        queue=queue,
        inputs=inputs,
        options=options,
        total_items=len(inputs),
        completed_items=0,
        failed_items=0,
        deadline_s=deadline_s,
        parent_job_id=parent_job_id,
        resumed_from=resumed_from,
        deferred=deferred,
        tenant=tenant,
        supersede_key=supersede_key,
        callback_url=callback_url,
        created_at=now,
        tag_rows=[JobTag(tag=tag, created_at=now) for tag in dict.fromkeys(tags)],
    )
    session.add(job)
    session.flush()
    session.add_all(JobParent(job_id=job_id, parent_id=parent) for parent in dict.fromkeys(waits_for))
    add_event(session, job_id, EventKind.SUBMITTED, actor=actor, detail={"items": len(inputs), "pipeline": pipeline})
    return job


def create_jobs(session: Session, jobs: list[dict[str, Any]], *, actor: str | None = None) -> None:
    """Many new ``pending`` jobs (a batch submit; a single submit is a batch of one) in three
    multi-row INSERTs (:func:`insert_rows`) — the jobs, their tags, their ``submitted`` events —
    instead of ORM flushes:
    what :func:`create_job` writes, at a fraction of the CPU. Each entry has the keys of
    :func:`create_job`'s arguments: ``id``, ``inputs``, ``options``, ``pipeline``, and optionally
    ``queue``, ``deadline_s``, ``parent_job_id``, ``deferred``, ``tenant``, ``tags``,
    ``supersede_key``, ``callback_url``.

    The jobs and their tags go in in id order: every index of both tables ends with the id after
    columns the batch shares (one ``created_at``), so each index then grows in one place instead of
    at random pages — a quarter of a 10,000-job batch's insert CPU on SQLite. The events keep the
    caller's order (their ids are the order a feed shows)."""
    now = utcnow()
    by_id = sorted(jobs, key=itemgetter("id"))
    job_records = [
        {"id": job["id"], "status": JobStatus.PENDING.value, "pipeline": job["pipeline"], "queue": job.get("queue"),
         "documents": job["inputs"], "options": job["options"], "total_items": len(job["inputs"]),
         "completed_items": 0, "failed_items": 0, "deadline_s": job.get("deadline_s"),
         "parent_job_id": job.get("parent_job_id"), "resumed_from": None, "deferred": job.get("deferred", False),
         "tenant": job.get("tenant"), "supersede_key": job.get("supersede_key"),
         "callback_url": job.get("callback_url"), "resumable": False, "fence": 0, "created_at": now}
        for job in by_id
    ]
    tags = [{"job_id": job["id"], "tag": tag, "created_at": now} for job in by_id
            for tag in dict.fromkeys(job.get("tags") or ())]
    events = [
        {"job_id": job["id"], "kind": EventKind.SUBMITTED.value, "reason": None, "source": None, "actor": actor,
         "detail": {"items": len(job["inputs"]), "pipeline": job["pipeline"]}, "at": now}
        for job in jobs
    ]
    if job_records and _dialect_name(session) == "postgresql":
        statement = _created_together(tuple(job_records[0]), tuple(tags[0]) if tags else None, tuple(events[0]))
        params = {_JOB_RECORDS: job_records, ROWS: events}
        if tags:
            params[_TAG_RECORDS] = tags
        session.execute(statement, params)
        return
    insert_rows(session, _jobs, job_records)
    insert_rows(session, JobTag.__table__, tags)
    add_events(session, events)


#: The parameters :func:`_created_together` binds the new jobs and their tags to (their events: ``ROWS``).
_JOB_RECORDS, _TAG_RECORDS = "job_records", "tag_records"


@lru_cache(maxsize=8)
def _created_together(job_columns: tuple[str, ...], tag_columns: tuple[str, ...] | None,
                      event_columns: tuple[str, ...]) -> Insert:
    """:func:`create_jobs` on PostgreSQL as one statement: the jobs and their tags inserted in a
    data-modifying ``WITH``, the ``submitted`` events by the statement itself — one statement and one
    round trip where there were three (a single submit's API CPU was 4.5 ms on PostgreSQL against
    3.1 on SQLite, mostly psycopg's and SQLAlchemy's per-statement work). The events' and tags'
    foreign keys are checked at the statement's end, when its jobs are there. The events' rows stay
    bound as ``ROWS`` at the top: what :mod:`tasks.notify` reads the submitted jobs from."""
    def inserted(table: Any, columns: tuple[str, ...], name: str) -> Any:
        records = recordset([table.c[column] for column in columns], name)
        return insert(table).from_select(list(columns), select(*records.c)).cte(f"new_{table.name}")

    ctes = [inserted(_jobs, job_columns, _JOB_RECORDS)]
    if tag_columns:
        ctes.append(inserted(JobTag.__table__, tag_columns, _TAG_RECORDS))
    return _insert_rows(JobEvent.__table__, event_columns).add_cte(*ctes)


def prunable(session: Session, before: datetime, limit: int) -> list[str]:
    """Up to ``limit`` ids of jobs that ended (terminal) before ``before``, oldest first. Unfinished
    jobs are never among them, however old."""
    return list(session.scalars(
        select(Job.id).where(Job.finished_at < before, Job.status.in_([s.value for s in _TERMINAL_EVENT]))
        .order_by(Job.finished_at).limit(limit)))


def delete_jobs(session: Session, job_ids: list[str]) -> int:
    """Delete these jobs with every row that hangs off them: items, events, tags, the ``job_parents``
    rows naming them either way. Jobs that point at one of them (``parent_job_id``, ``resumed_from``)
    keep their own rows and forget the reference. Explicit deletes, not ``ON DELETE CASCADE`` alone:
    SQLite files made before migration 0008 keep their old constraints. Returns the jobs deleted."""
    if not job_ids:
        return 0
    for table, column in ((JobItem.__table__, "job_id"), (JobEvent.__table__, "job_id"),
                          (JobTag.__table__, "job_id"), (JobParent.__table__, "job_id"),
                          (JobParent.__table__, "parent_id")):
        session.execute(delete(table).where(table.c[column].in_(job_ids)))
    for column in (_jobs.c.parent_job_id, _jobs.c.resumed_from):
        session.execute(update(_jobs).where(column.in_(job_ids)).values({column: None}))
    return session.execute(delete(_jobs).where(_jobs.c.id.in_(job_ids))).rowcount


def _ms(start: datetime | None, end: datetime | None) -> float | None:
    return round((end - start).total_seconds() * 1000, 3) if start and end else None


def usage_totals(session: Session, job_id: str) -> dict[str, Any] | None:
    """The job's LLM token totals over its items that reported usage, in one indexed query."""
    items, prompt, completion, cut, estimated = session.execute(
        select(func.count(), func.coalesce(func.sum(JobItem.prompt_tokens), 0),
               func.coalesce(func.sum(JobItem.completion_tokens), 0),
               func.coalesce(func.sum(case((JobItem.usage_cut_short.is_(True), 1), else_=0)), 0),
               func.coalesce(func.max(case((JobItem.usage_estimated.is_(True), 1), else_=0)), 0))
        .where(JobItem.job_id == job_id, JobItem.prompt_tokens.is_not(None))).one()
    if not items:
        return None
    return {"prompt_tokens": prompt, "completion_tokens": completion, "items": items, "cut_short_items": cut,
            "estimated": bool(estimated)}


def job_object(job: Job, usage: dict[str, Any] | None = None) -> dict[str, Any]:
    """A job as andon shows it to the world — ``GET /api/jobs/{id}``, the dashboard and the webhook
    body are all this one dict (times as datetimes; the API's JobView serializes them)."""
    latency = None if job.cancel_requested_at is None else {
        "request_to_observe_ms": _ms(job.cancel_requested_at, job.cancel_observed_at),
        "observe_to_stop_ms": _ms(job.cancel_observed_at, job.finished_at)}
    return {
        "job_id": job.id, "pipeline": job.pipeline, "status": job.status,
        "cancelled": job.status == JobStatus.CANCELLED.value, "cancellation_reason": job.cancellation_reason,
        "cancellation_message": job.cancellation_message, "cancellation_source": job.cancellation_source,
        "total_items": job.total_items, "completed_items": job.completed_items, "failed_items": job.failed_items,
        "resumable": job.resumable, "error": job.error, "created_at": job.created_at, "started_at": job.started_at,
        "cancel_requested_at": job.cancel_requested_at, "cancel_observed_at": job.cancel_observed_at,
        "finished_at": job.finished_at, "cancel_latency": latency, "resumed_from": job.resumed_from,
        "resumed_by": job.resumed_by, "parent_job_id": job.parent_job_id, "tags": job.tags, "usage": usage,
    }
