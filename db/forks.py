"""Forking a process whose other threads use the database, without handing the child a locked SQLite.

A prefork worker's main process forks a new pool child whenever one exits (a kill, a hard time limit,
a lost child) while its own threads — the sweeps, the reaper, the look at skipped jobs' rows — use the
database. SQLite keeps process-wide mutexes (its allocator's, its file-locking layer's); a fork taken
while another thread holds one leaves it locked for good in the child, whose first connection then
waits forever. ``make chaos`` caught one: a replacement child stuck in ``sqlite3Malloc`` while it held
the writer turn, and every writer of every process behind it.

:func:`guard_forks` makes a fork wait until no other thread has a connection open or checked out
(new ones wait for the fork), for at most ``FORK_WAIT_S``: past that it forks anyway and says so.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import Pool

__all__ = ["FORK_WAIT_S", "guard_forks"]

log = logging.getLogger(__name__)

#: The longest a fork waits for other threads to put their connections back.
FORK_WAIT_S = 5.0
_KEY = "andon.fork_guard"

_cond = threading.Condition()
_held: dict[int, int] = {}  # thread ident -> connections it has open or checked out
_forking = False
_installed = False


def guard_forks() -> None:
    """From now on, in this process and the children it forks, a fork waits for the database."""
    global _installed
    if _installed:
        return
    _installed = True
    event.listen(Engine, "do_connect", _connecting)
    event.listen(Pool, "checkout", _checked_out)
    event.listen(Pool, "checkin", _checked_in)
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)


def _enter(record) -> None:
    if record is None or _KEY in record.info:
        return
    me = threading.get_ident()
    with _cond:
        while _forking and not _held.get(me):  # a thread already inside goes on: the fork waits for it
            _cond.wait()
        _held[me] = _held.get(me, 0) + 1
    record.info[_KEY] = me


def _connecting(_dialect, record, _cargs, _cparams) -> None:
    _enter(record)  # the connect itself (and its pragmas) is inside; a failed one leaves a hold the wait bounds


def _checked_out(_dbapi_connection, record, _proxy) -> None:
    _enter(record)


def _checked_in(_dbapi_connection, record) -> None:
    owner = record.info.pop(_KEY, None) if record is not None else None
    if owner is None:
        return
    with _cond:
        left = _held.get(owner, 0) - 1
        if left > 0:
            _held[owner] = left
        else:
            _held.pop(owner, None)
        _cond.notify_all()


def _before_fork() -> None:
    global _forking
    me = threading.get_ident()
    with _cond:
        _forking = True
        deadline = time.monotonic() + FORK_WAIT_S
        while any(thread != me for thread in _held):
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("andon: forking while %d other thread(s) still hold database connections",
                            sum(1 for thread in _held if thread != me))
                break
            _cond.wait(left)


def _after_fork_in_parent() -> None:
    global _forking
    with _cond:
        _forking = False
        _cond.notify_all()


def _after_fork_in_child() -> None:
    """The child starts with no thread inside (the parent's other threads are not in it) and a new
    condition (another thread may have held the old one's lock at the fork)."""
    global _cond, _held, _forking
    _cond, _held, _forking = threading.Condition(), {}, False
