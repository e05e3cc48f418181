"""Group commit of a job run's finished items: each is durable within a short window of ending.

One transaction per item made no-op items cost a commit each (and a job-change notification each),
serialized on SQLite's single writer. :class:`ItemCommitter` gathers the items that end within
``window_s`` of the first one still unwritten and writes them in one transaction, from a thread of
its own, so the job's thread goes on to its next item meanwhile.

The promises, and where they are kept:

* an item is handed to the writer at most ``window_s`` after it ended (then its transaction's time);
* :meth:`ItemCommitter.close` writes everything pending — the runner calls it before the job's
  terminal row, on every exit path it sees (a failure, ``SystemExit`` from a time limit or a cold
  shutdown), and the escalation ladder before it kills the process; a job that was cancelled or ran
  through takes what is pending with :meth:`ItemCommitter.detach` and writes it in its terminal
  row's own transaction instead (never after it: the two commit together or not at all);
* a cancel does not wake the writer: the job's thread, observing it, takes what is pending into its
  terminal transaction (:meth:`ItemCommitter.detach`), and a batch the writer had started instead
  would make that end wait for it; if the job is slow to observe, the window still runs out as ever;
* a batch is one transaction, fenced like a single item: a run that lost the job has the whole batch
  refused.

What it can't do: survive a SIGKILL from outside (the OOM killer, ``kill -9``) — the items of the
last window are lost then, and resume runs them again. ``window_s`` = 0 commits each item in the
job's own thread the moment it ends, as before.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["ItemCommitter"]

R = TypeVar("R")


class ItemCommitter(Generic[R]):
    """Hands ``write`` the items :meth:`add` ed, in order, in batches at most ``window_s`` old.

    ``write`` (a list of records → one transaction) is called by one thread at a time. If it raises,
    the error is raised again in the job's thread by the next :meth:`add` or :meth:`close`.
    """

    def __init__(self, write: Callable[[list[R]], None], window_s: float, name: str = "andon-commit") -> None:
        self._write = write
        self.window_s = window_s
        self._name = name
        self._pending: list[R] = []
        self._oldest = 0.0  # monotonic time the oldest pending record was added
        self._closed = False
        self._error: BaseException | None = None
        self._wake = threading.Condition()
        self._writing = threading.Lock()  # one batch at a time, in order
        self._thread: threading.Thread | None = None

    def add(self, record: R) -> None:
        """A record that ended (in the job's thread). Raises what a background write raised."""
        self._raise_error()
        if self.window_s <= 0:
            with self._writing:
                self._write([record])
            return
        with self._wake:
            if self._closed:  # torn down past close(): write it here rather than drop it
                self._pending.append(record)
            else:
                if not self._pending:
                    self._oldest = time.monotonic()
                    self._wake.notify()
                self._pending.append(record)
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                    self._thread.start()
                return
        self.flush()

    def flush(self, timeout: float = -1) -> bool:
        """Write everything pending now, in the calling thread; False if another write held the
        writer past ``timeout`` (seconds; -1 waits)."""
        if not self._writing.acquire(timeout=timeout):
            return False
        try:
            with self._wake:
                batch, self._pending = self._pending, []
            if batch:
                self._write(batch)
        finally:
            self._writing.release()
        return True

    def close(self) -> None:
        """Stop the writer thread and write what is left, here. Raises what a write raised."""
        self._stop_thread()
        self._raise_error()
        self.flush()

    def detach(self) -> list[R]:
        """Stop the writer thread and hand back what it had not written, for the caller to write in
        a transaction of its own — the job's end, so a job that ran through costs one transaction
        less. Raises what a write raised. What :meth:`add` gets after this is written at once.

        It waits for a batch the thread is writing, not for the thread to end: waking an idle thread
        only to join it cost the job's end a scheduler round trip (milliseconds on a busy machine).
        The thread writes under the same lock, and once this is closed it takes nothing more."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        with self._writing:  # a batch in flight ends first (its error is set under this lock too)
            self._raise_error()
            with self._wake:
                rest, self._pending = self._pending, []
        return rest

    def _stop_thread(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def _raise_error(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed:
                    if self._pending and time.monotonic() >= self._oldest + self.window_s:
                        break
                    self._wake.wait(None if not self._pending else self._oldest + self.window_s - time.monotonic())
                if self._closed:
                    return  # close() writes the rest in its own thread
            if not self._write_pending():
                return

    def _write_pending(self) -> bool:
        """The thread's turn: write what is pending; False after a failed write. The error is handed
        to the job's thread, set before the write lock is let go (:meth:`detach` looks under it)."""
        with self._writing:
            with self._wake:
                batch, self._pending = self._pending, []
            try:
                if batch:
                    self._write(batch)
            except BaseException as exc:  # nothing more is written from this thread
                self._error = exc
                with self._wake:
                    self._closed = True
                return False
        return True
