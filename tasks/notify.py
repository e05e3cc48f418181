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
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from redis.exceptions import RedisError
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import Pool
from sqlalchemy.sql.dml import Insert

from tasks.cancellation.keys import job_changes_channel
from tasks.process import get_redis

__all__ = ["channel_for", "install", "notify"]

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


def notify(job_id: str, kind: str) -> None:
    """Tell every listening stream that ``job_id`` changed. Never raises."""
    global _quiet_until
    if time.monotonic() < _quiet_until:
        return
    try:
        client = get_redis()
        client.publish(channel_for(client), json.dumps({"job_id": job_id, "kind": kind}))
    except RedisError as exc:
        _quiet_until = time.monotonic() + QUIET_AFTER_ERROR_S
        log.warning("job-change notification for %s not sent (%s); streams fall back to polling", job_id, exc)
    except Exception:  # a notification must never break the write it announces
        log.exception("job-change notification for %s failed", job_id)


def install() -> None:
    """Announce every committed insert of job events and item rows, in this process, whoever wrote
    it (ORM session or plain connection). Idempotent; call once per process that writes rows.

    Three SQLAlchemy hooks on every engine: ``after_execute`` notes the job ids an INSERT into
    ``job_events`` / ``job_items`` carries; ``commit`` / ``rollback`` keep or drop them; the pool's
    ``checkin`` — after the commit has really happened — publishes one notification per job.
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


def _after_execute(conn, clause, multiparams, params, _options, _result) -> None:
    if not isinstance(clause, Insert):
        return
    kind = _ROW_KINDS.get(getattr(clause.table, "name", ""))
    if kind is None:
        return
    rows = multiparams or [params]
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
    conn.info.pop(_PENDING, None)


def _after_checkin(_dbapi_connection, record) -> None:
    committed = record.info.pop(_COMMITTED, None) if record is not None else None
    for job_id, kind in (committed or {}).items():
        notify(job_id, kind)
