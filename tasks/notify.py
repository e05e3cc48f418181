"""Job-change notifications: a tiny pub/sub message whenever a job's rows or heartbeat change, so an
event stream re-reads the database when something happened instead of polling it.

A notification says *that* a job changed, never *what*: ``{"job_id": ..., "kind": "event" | "item" |
"heartbeat"}``. Readers go to the database (and the heartbeat key) for the rest, so a notification
lost on the way costs a reader at most its slow safety poll — never an event.

What it can't do: deliver anything while Redis is away. :func:`notify` is best-effort and never
raises into the job that wrote the row: a Redis error is logged and swallowed, and for a few seconds
after one this process doesn't try again, so an outage costs a running job no connect timeout per
item.

Rows are announced where they are written, after their transaction commits (:func:`install`), not
by each writer: a reader woken before the commit would read nothing and then sleep until its poll.
They are published by a thread of this process, not by the writer: a job's commit doesn't wait on a
Redis round trip (a few of them per job, each milliseconds on a busy machine). A notification still
unsent when the process is killed is lost like any other: readers poll.

A writer that makes a Redis round trip of its own after the commit may take its rows' notifications
off the hook (:func:`claim`) and publish them in that round trip: a submit sends them with its jobs'
messages (:func:`tasks.sending.enqueue_many`), so its request doesn't wake the thread at all.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import time
from collections.abc import Iterable
from typing import Any

from redis.exceptions import RedisError
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import Pool
from sqlalchemy.sql.dml import Insert

from db.jobs import INSERTS_INTO, ROWS
from tasks.cancellation.keys import job_changes_channel
from tasks.process import get_redis

__all__ = ["channel_for", "channel_on", "claim", "install", "notify", "notify_in", "notify_soon"]

log = logging.getLogger(__name__)

#: After a Redis error, how long this process stays quiet before trying to publish again.
QUIET_AFTER_ERROR_S = 5.0

#: Tables whose inserted rows a stream shows, and the notification kind each one sends.
_ROW_KINDS = {"job_events": "event", "job_items": "item"}
_PENDING = "andon.notify.pending"
_COMMITTED = "andon.notify.committed"

_quiet_until = 0.0
_install_lock = threading.Lock()
_installed = False


def channel_for(client: Any) -> str:
    """The channel of the Redis database ``client`` talks to (a sync or asyncio client)."""
    return job_changes_channel(client.connection_pool.connection_kwargs.get("db", 0))


def channel_on(client: Any) -> str | None:
    """The channel this process's notifications go to, if ``client`` (a sync client of another
    pool: the broker's) talks to the same Redis server; else None. Pub/sub spans a server's
    databases, so the server is what counts, and the channel is named after this process's database."""
    ours = get_redis().connection_pool.connection_kwargs
    theirs = client.connection_pool.connection_kwargs
    if any(ours.get(key) != theirs.get(key) for key in ("host", "port", "path")):
        return None
    return channel_for(get_redis())


def notify(job_id: str, kind: str) -> None:
    """Tell every listening stream that ``job_id`` changed, now. Never raises."""
    _publish([(job_id, kind)])


def notify_in(pipe: Any, job_id: str, kind: str, channel: str | None = None) -> None:
    """Queue the notification on the caller's Redis pipeline, after the write it announces: one
    round trip for both (the heartbeat: its key and its notification). The caller's error handling
    is the notification's. ``channel``: :func:`channel_on` of a pipeline of another pool."""
    pipe.publish(channel or channel_for(pipe), _message(job_id, kind))


def _message(job_id: str, kind: str) -> str:
    return json.dumps({"job_id": job_id, "kind": kind})


def _publish(changes: list[tuple[str, str]]) -> None:
    """One round trip for all of ``changes`` (a pipeline of PUBLISHes). Never raises."""
    global _quiet_until
    if time.monotonic() < _quiet_until or not changes:
        return
    try:
        client = get_redis()
        channel = channel_for(client)
        if len(changes) == 1:
            client.publish(channel, _message(*changes[0]))
            return
        pipe = client.pipeline(transaction=False)
        for job_id, kind in changes:
            pipe.publish(channel, _message(job_id, kind))
        pipe.execute()
    except RedisError as exc:
        _quiet_until = time.monotonic() + QUIET_AFTER_ERROR_S
        log.warning("job-change notification for %s not sent (%s); streams fall back to polling",
                    changes[0][0], exc)
    except Exception:  # a notification must never break the write it announces
        log.exception("job-change notification for %s failed", changes[0][0])


class _Outbox:
    """Notifications waiting for this process's publisher thread; one per job and kind (a
    notification says only *that* a job changed, so two unsent ones say no more than one)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._pending: dict[tuple[str, str], None] = {}
        self._wake = threading.Condition()
        threading.Thread(target=self._run, name="andon-notify", daemon=True).start()
        atexit.register(self.flush)  # a CLI command's last write still wakes the streams

    def put(self, job_id: str, kind: str) -> None:
        with self._wake:
            if not self._pending:  # else the thread is awake already, or about to take what is pending
                self._wake.notify()
            self._pending[(job_id, kind)] = None

    def flush(self) -> None:
        if os.getpid() != self.pid:
            return  # a forked child's copy: its parent's pending notifications are not its own
        with self._wake:
            changes, self._pending = list(self._pending), {}
        _publish(changes)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._pending:
                    self._wake.wait()
            self.flush()


_outbox: _Outbox | None = None


def notify_soon(job_id: str, kind: str) -> None:
    """Hand the notification to this process's publisher thread (the caller doesn't wait on Redis)."""
    global _outbox
    outbox = _outbox
    if outbox is None or outbox.pid != os.getpid():  # none yet, or made before a fork: no thread here
        with _install_lock:
            if _outbox is None or _outbox.pid != os.getpid():
                _outbox = _Outbox()
            outbox = _outbox
    outbox.put(job_id, kind)


def install() -> None:
    """Announce every committed insert of job events and item rows, in this process, whoever wrote
    it (ORM session or plain connection). Idempotent; call once per process that writes rows.

    Three SQLAlchemy hooks on every engine: ``after_execute`` notes the job ids an INSERT into
    ``job_events`` / ``job_items`` carries (or a statement that names the table it inserts into
    inside a ``WITH``, :data:`db.jobs.INSERTS_INTO`, binds as ``job_id``; or, for many rows in one
    parameter, :data:`db.jobs.ROWS`, each row's ``job_id``); ``commit`` / ``rollback`` keep or drop them; the pool's
    ``checkin`` — after the commit has really happened — hands one notification per job to the
    process's publisher thread.
    """
    global _installed
    with _install_lock:
        if _installed:
            return
        event.listen(Engine, "after_execute", _after_execute)
        event.listen(Engine, "commit", _after_commit_requested)
        event.listen(Engine, "rollback", _after_rollback)
        event.listen(Pool, "checkin", _after_checkin)
        _installed = True


def claim(conn: Any, job_ids: Iterable[str]) -> set[str]:
    """Take these jobs' notifications off the uncommitted rows of ``conn`` (a Connection in the
    transaction that wrote them): the caller publishes them itself, after the commit. Returns the
    ids taken — the ones the hook would have announced (none where :func:`install` wasn't called).
    For jobs whose rows in this transaction the caller's notification covers, every kind of them:
    a notification says only *that* a job changed."""
    pending = conn.info.get(_PENDING)
    if not pending:
        return set()
    return {job_id for job_id in job_ids if pending.pop(job_id, None) is not None}


def _after_execute(conn, clause, multiparams, params, options, _result) -> None:
    # a statement whose INSERT is inside a data-modifying WITH names its table (db.jobs.INSERTS_INTO)
    table = getattr(clause.table, "name", "") if isinstance(clause, Insert) else options.get(INSERTS_INTO)
    kind = _ROW_KINDS.get(table) if table else None
    if kind is None:
        return
    rows = multiparams or [params]
    if len(rows) == 1 and isinstance(rows[0], dict) and isinstance(rows[0].get(ROWS), list):
        rows = rows[0][ROWS]  # many rows in one parameter (db.jobs.insert_rows on PostgreSQL)
    job_ids = {row.get("job_id") for row in rows if isinstance(row, dict)} - {None}
    if job_ids:
        pending = conn.info.setdefault(_PENDING, {})
        for job_id in job_ids:
            pending.setdefault(job_id, kind)


def _after_commit_requested(conn) -> None:
    # this hook runs just *before* the DBAPI commit: hold the ids until the connection goes back
    pending = conn.info.pop(_PENDING, None)
    if pending:
        conn.info.setdefault(_COMMITTED, {}).update(pending)


def _after_rollback(conn) -> None:
    # a connection the server dropped is invalidated before its rollback: its info went with it, and
    # touching it would raise PendingRollbackError over the disconnect (which retry_transient retries)
    if not conn.invalidated:
        conn.info.pop(_PENDING, None)


def _after_checkin(_dbapi_connection, record) -> None:
    committed = record.info.pop(_COMMITTED, None) if record is not None else None
    for job_id, kind in (committed or {}).items():
        notify_soon(job_id, kind)
