"""Engines and sessions, one per process and database URL."""

from __future__ import annotations

import fcntl
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from db.settings import get_settings

log = logging.getLogger(__name__)
T = TypeVar("T")

_engines: dict[tuple[int, str], Engine] = {}


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL lets the API read while a worker writes; busy_timeout makes writers queue, not fail.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={int(get_settings().sqlite_busy_timeout_ms)}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 10, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    engine = create_engine(url, pool_size=5, max_overflow=10)
    event.listen(engine, "checkin", _idle_from_now)
    event.listen(engine, "checkout", _ping_if_idle)
    return engine


#: A pooled connection idle longer than this is pinged before use (a restarted server left it dead).
#: SQLAlchemy's ``pool_pre_ping`` pings on *every* checkout: a round trip each, four or five per job.
#: A connection back in use within this long that still finds the server gone fails its statement
#: as a disconnect instead: SQLAlchemy then invalidates the whole pool, and ``retry_transient``'s
#: callers (item, start, terminal and cancel writes) go again on fresh connections.
PING_AFTER_IDLE_S = 1.0


def _idle_from_now(_dbapi_connection, record) -> None:
    record.info["idle_since"] = time.monotonic()


def _ping_if_idle(dbapi_connection, record, _proxy) -> None:
    """SQLAlchemy's documented custom pessimistic ping (a checkout handler; raising
    ``DisconnectionError`` makes the pool retry with a new connection), only after an idle spell."""
    since = record.info.get("idle_since")
    if since is None or time.monotonic() - since < PING_AFTER_IDLE_S:
        return
    try:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("SELECT 1")
        finally:
            cursor.close()
        # psycopg began a transaction for the ping: hand the connection out idle (autocommit can only
        # be set on an idle one, read_only_connection)
        dbapi_connection.rollback()
    except Exception as exc:
        raise DisconnectionError(f"pooled connection found dead: {exc}") from exc


#: How long after this process's first commit since the last checkpoint (in the API) it checkpoints.
CHECKPOINT_INTERVAL_S = 0.5
_checkpointers: dict[tuple[int, str], Callable[[], None]] = {}
_checkpointers_lock = threading.Lock()


def checkpoint_in_background(url: str | None = None,
                             interval_s: float = CHECKPOINT_INTERVAL_S) -> Callable[[], None]:
    """On a SQLite file, this process's commits stop checkpointing the WAL: a thread does it
    ``interval_s`` after a commit that changed rows instead. SQLite's automatic checkpoint runs inside
    the commit that fills the WAL past 1,000 pages (every few dozen submits) and syncs the database
    file there — 5 to 7 ms added to that one request, most of a single submit's p99. A passive
    checkpoint blocks no writer; other processes (workers) keep SQLite's automatic checkpoints, so the
    WAL stays bounded without us. The thread sleeps while this process only reads: a wake-up every
    half second took the GIL from a request thread now and then, and on a busy box the request then
    waited for the scheduler to hand it back (50–250 ms of a list request's p99, bench/scale.py).
    Returns what stops the thread (it runs for the life of the process otherwise)."""
    engine = get_engine(url)
    path = engine.url.database if engine.dialect.name == "sqlite" else None
    if not path or path == ":memory:":
        return lambda: None
    key = (os.getpid(), str(engine.url))
    with _checkpointers_lock:
        if key in _checkpointers:
            return _checkpointers[key]
        wrote, stop = threading.Event(), threading.Event()

        def stop_thread() -> None:
            stop.set()
            wrote.set()

        _checkpointers[key] = stop_thread
    event.listen(engine, "connect", _no_autocheckpoint)
    event.listen(engine, "commit", lambda conn: _note_changes(conn, wrote))
    engine.dispose()  # pooled connections made before are closed: each new one gets the pragma
    threading.Thread(target=_checkpoints, args=(engine, interval_s, wrote, stop), name="andon-wal-checkpoint",
                     daemon=True).start()
    return stop_thread


def _no_autocheckpoint(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA wal_autocheckpoint=0")
    cursor.close()


def _note_changes(conn: Connection, wrote: threading.Event) -> None:
    """At a commit: wake the checkpoint thread if this connection changed rows since its last commit
    (every request's session commits, reads too; ``total_changes`` is a counter SQLite keeps)."""
    changes = conn.connection.driver_connection.total_changes
    if changes != conn.info.get("andon_total_changes", 0):  # a new connection has changed nothing
        conn.info["andon_total_changes"] = changes
        wrote.set()


def _checkpoints(engine: Engine, interval_s: float, wrote: threading.Event, stop: threading.Event) -> None:
    """Checkpoint the WAL ``interval_s`` after a commit that wrote, until ``stop`` is set (a daemon
    thread): commits meanwhile share that checkpoint; one after it wakes the thread again."""
    while True:
        wrote.wait()
        if stop.wait(interval_s):
            return
        wrote.clear()
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
        except Exception as exc:  # a locked or vanished file now: the next commit tries again
            log.warning("WAL checkpoint failed: %s", str(exc).splitlines()[0][:200])
            wrote.set()


def get_engine(url: str | None = None) -> Engine:
    """The engine for ``url`` (default: settings) in this process; a forked child gets its own."""
    url = url or get_settings().resolved_database_url
    key = (os.getpid(), url)
    if key not in _engines:
        _engines[key] = make_engine(url)
    return _engines[key]


_sessionmakers: dict[Engine, sessionmaker[Session]] = {}


def get_sessionmaker(url: str | None = None) -> sessionmaker[Session]:
    """One per engine: each ``sessionmaker`` makes a Session subclass of its own, and SQLAlchemy sets
    up that class's event dispatch on its first use — a few KiB and tens of microseconds that a new
    maker per session paid on every ``session_scope``, then left to the cyclic garbage collector."""
    engine = get_engine(url)
    maker = _sessionmakers.get(engine)
    if maker is None:
        maker = _sessionmakers[engine] = sessionmaker(engine, expire_on_commit=False)
    return maker


@contextmanager
def session_scope(url: str | None = None, *, writer: bool = False) -> Iterator[Session]:
    """A session that commits on success and rolls back on error. ``writer``: a short write on a
    latency path (a cancel's row, a job's terminal row) that takes its turn with the hot-path writers
    (:func:`_sqlite_writer_turn`) instead of meeting them in SQLite's sleeping busy handler."""
    if writer:
        with _sqlite_writer_turn(get_engine(url)), session_scope(url) as session:
            yield session
        return
    session = get_sessionmaker(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def read_only_connection(url: str | None = None) -> Connection:
    """A connection for reads outside any transaction (use it as a context manager): each statement
    on its own, in autocommit. On PostgreSQL a read is then one round trip — in a transaction it
    is three (BEGIN, the SELECT, and the ROLLBACK of the connection's return to the pool). SQLite's
    driver begins no transaction for a read: its connection is left as it is."""
    engine = get_engine(url)
    conn = engine.connect()
    return conn.execution_options(isolation_level="AUTOCOMMIT") if engine.dialect.name == "postgresql" else conn


@contextmanager
def statement_writes(url: str | None = None) -> Iterator[Connection]:
    """A connection whose writes each commit as they run, for a write that is one statement on
    PostgreSQL (a data-modifying ``WITH``): in autocommit it is one round trip where BEGIN, the
    statement and COMMIT took three, and the row locks it takes are held for that statement alone.
    The commit at the end costs no round trip; it is what :mod:`tasks.notify`'s hook announces the
    inserted rows on. Only for PostgreSQL: a write of several statements wants :func:`transaction`."""
    with get_engine(url).connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        yield conn
        conn.commit()


@contextmanager
def transaction(url: str | None = None) -> Iterator[Connection]:
    """A plain connection in one transaction, committed on success: for the per-item hot path, where
    a Session's bookkeeping would cost more than the SQL."""
    engine = get_engine(url)
    with _sqlite_writer_turn(engine), engine.begin() as conn:
        yield conn


_writer_locks: dict[tuple[int, str], tuple[int, threading.Lock] | None] = {}


@contextmanager
def _sqlite_writer_turn(engine: Engine) -> Iterator[None]:
    """On a SQLite file, writers on the hot path take turns on a file lock (and a thread lock) first:
    SQLite's own busy wait sleeps a millisecond or more per retry, far longer than the commit it
    waits for. The kernel drops the lock of a process that dies; SQLite still arbitrates everyone else.
    """
    key = (os.getpid(), str(engine.url))
    if key not in _writer_locks:
        path = engine.url.database if engine.dialect.name == "sqlite" else None
        _writer_locks[key] = ((os.open(f"{path}.write-lock", os.O_RDWR | os.O_CREAT, 0o600), threading.Lock())
                              if path and path != ":memory:" else None)
    turn = _writer_locks[key]
    if turn is None:
        yield
        return
    fd, in_process = turn
    with in_process:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)


#: OperationalErrors that say "never": a schema that doesn't match the code (a deploy without its
#: migration) won't fix itself by waiting.
_PERMANENT = ("no such table", "no such column", "has no column named", "syntax error", "does not exist")


def is_transient(exc: BaseException) -> bool:
    """A database error that says "not now" rather than "never": a lock held past SQLite's busy
    timeout, a connection refused or dropped (a PostgreSQL restart). Constraint violations, bad SQL
    and a schema the code doesn't match are not."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, (OperationalError, InterfaceError)):
        text = str(exc.orig if getattr(exc, "orig", None) is not None else exc).lower()
        return not any(marker in text for marker in _PERMANENT)
    return False


def retry_transient(write: Callable[[], T], *, within_s: float, what: str = "database write") -> T:
    """Run ``write`` (a whole transaction), again after a transient error, with exponential backoff
    and jitter, for at most ``within_s`` seconds; then the last error is raised."""
    deadline = time.monotonic() + within_s
    delay = 0.05
    while True:
        try:
            return write()
        except Exception as exc:
            if not is_transient(exc) or time.monotonic() + delay > deadline:
                raise
            log.warning("%s failed (%s); retrying in %.2fs", what, str(exc).splitlines()[0][:200], delay)
            time.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 2.0)
