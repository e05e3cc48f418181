"""Engines and sessions, one per process and database URL."""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from db.settings import get_settings

_engines: dict[tuple[int, str], Engine] = {}


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL lets the API read while a worker writes; busy_timeout makes writers queue, not fail.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
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
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)


def get_engine(url: str | None = None) -> Engine:
    """The engine for ``url`` (default: settings) in this process; a forked child gets its own."""
    url = url or get_settings().resolved_database_url
    key = (os.getpid(), url)
    if key not in _engines:
        _engines[key] = make_engine(url)
    return _engines[key]


def get_sessionmaker(url: str | None = None) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = get_sessionmaker(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


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
