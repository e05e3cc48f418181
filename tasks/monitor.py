"""A watchdog thread beside each running job: heartbeat, memory ceiling, and the escalation ladder.

It runs in the worker child next to the job's own thread, so it keeps working while a stage waits
on I/O or spins without looking at its token. What it can't do: run while another thread holds the
GIL in a C call that never releases it — then the heartbeat stops too, and the job is treated as
lost by the reaper.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil
from redis.exceptions import RedisError

from db import jobs as job_rows
from db.session import session_scope
from db.vocabulary import CancellationReason, CancellationSource, EventKind
from tasks.cancellation import CancellationToken, ForcedCancellation
from tasks.cancellation.keys import heartbeat_key
from tasks.control import request_cancel
from tasks.errors import AndonError
from tasks.notify import notify_in
from tasks.process import get_redis

__all__ = ["JobMonitor", "Ladder"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ladder:
    """How hard to push a job that ignores its cancel, counted from the cancel request.

    1. ``raise_after_s``: raise :class:`ForcedCancellation` into the threads running the job's stages
       (and cancel its async tasks again). Stops a Python loop that never checks; can't interrupt a
       blocking system or C call (the exception only lands when control returns to Python).
    2. ``kill_after_s``: SIGKILL this child. The worker's main process finalizes the row with the
       token's reason; the item in progress is lost, every finished item is kept.
    """

    raise_after_s: float = 10.0
    kill_after_s: float = 20.0


class JobMonitor:
    """Beats every ``interval_s`` (the key lives 3 beats), cancels the job above ``max_rss_mb``, and
    escalates along the :class:`Ladder` once the job is cancelled but hasn't stopped."""

    def __init__(self, job_id: str, token: CancellationToken, interval_s: float,
                 max_rss_mb: float | None = None, ladder: Ladder = Ladder(), owner: str | None = None) -> None:
        self.job_id = job_id
        self.owner = owner
        self.token = token
        self.interval_s = interval_s
        self.max_rss_mb = max_rss_mb
        self.ladder = ladder
        #: (item index, stage) the job is at; written by the job thread, published with each beat.
        self.position: tuple[int, str] | None = None
        #: Set by the job thread on its exit path (:meth:`disarm`): no escalation after that.
        self.observed = threading.Event()
        self._job_thread = threading.get_ident()
        #: The ladder's first step; the runner points it at the job's item run.
        self.force = self._raise_into_job_thread
        #: Runs just before the ladder kills this child; the runner writes the items still in its
        #: commit window there, so the kill loses nothing that ended.
        self.before_kill: Callable[[], object] = lambda: None
        self._ladder_lock = threading.Lock()
        self._forced_job_thread = False
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"andon-monitor-{job_id[:8]}", daemon=True)
        self._cancelled_at: float | None = None
        self._step = 0
        token.register_callback(self._on_cancel)

    def start(self) -> JobMonitor:
        """Start the thread; it beats first thing (the job's thread doesn't wait on Redis for it, and
        the reaper gives a job three beats after its start before it looks for one)."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating; returns at once. The thread removes the heartbeat key as its last act — after
        its last beat, so no beat can bring the key back — and the job's thread doesn't wait for it
        to wake, beat or round-trip to Redis (the key was the one the reaper reads for a *running*
        row; this runs once the row is terminal)."""
        self._stop.set()
        self._wake.set()

    def beat(self) -> None:
        item, stage = self.position or (None, None)
        value = json.dumps({"pid": os.getpid(), "owner": self.owner, "item": item, "stage": stage})
        with get_redis().pipeline(transaction=False) as pipe:  # the beat and its notification: one round trip
            pipe.set(heartbeat_key(self.job_id), value, px=int(self.interval_s * 3000))
            notify_in(pipe, self.job_id, "heartbeat")
            pipe.execute()

    def disarm(self) -> None:
        """Called by the job thread as its exit path begins: no forced cancel can land after this, so
        none can interrupt the commits that end the job. One sent to this thread but not yet
        delivered is withdrawn (``PyThreadState_SetAsyncExc`` with NULL)."""
        while True:
            try:
                with self._ladder_lock:
                    self.observed.set()
                    if self._forced_job_thread:
                        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._job_thread), None)
                return
            except ForcedCancellation:  # delivered while we were getting here: it is spent now
                continue

    def _raise_into_job_thread(self) -> None:
        self._forced_job_thread = True
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._job_thread),
                                                   ctypes.py_object(ForcedCancellation))

    def _on_cancel(self, _token: CancellationToken) -> None:
        self._cancelled_at = time.monotonic()
        self._wake.set()  # the ladder's clock starts now

    def _run(self) -> None:
        try:
            self._watch()
        finally:
            self._remove_heartbeat()

    def _remove_heartbeat(self) -> None:
        try:
            get_redis().delete(heartbeat_key(self.job_id))
        except RedisError:
            pass  # it expires by itself

    def _watch(self) -> None:
        next_beat, first = time.monotonic(), True
        while not self._stop.is_set():
            try:
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self.interval_s
                    self.beat()
                    if self.max_rss_mb and not first:  # as before: the ceiling is looked at from the second beat
                        self._check_memory()
                    first = False
                self._escalate()
            except RedisError as exc:  # it beats again; a job must not die because Redis blinked
                log.warning("heartbeat of %s failed: %s", self.job_id, exc)
            except Exception:
                log.exception("job monitor for %s", self.job_id)
            self._wake.wait(self._sleep_s(next_beat))
            self._wake.clear()

    def _sleep_s(self, next_beat: float) -> float:
        wait = next_beat - time.monotonic()
        if self._cancelled_at is not None and self._step < 2:
            steps = (self.ladder.raise_after_s, self.ladder.kill_after_s)
            wait = min(wait, self._cancelled_at + steps[self._step] - time.monotonic())
        return max(wait, 0.01)

    def _check_memory(self) -> None:
        rss_mb = psutil.Process().memory_info().rss / 2**20
        if rss_mb <= self.max_rss_mb or self.token.is_cancelled:
            return
        try:
            request_cancel(self.job_id, CancellationReason.RESOURCE_LIMIT,
                           f"RSS {rss_mb:.0f} MiB above the {self.max_rss_mb:g} MiB ceiling",
                           CancellationSource.MEMORY_WATCHDOG, actor=f"pid:{os.getpid()}")
        except AndonError:
            pass

    def _escalate(self) -> None:
        if self._cancelled_at is None or self.observed.is_set():
            return
        waited = time.monotonic() - self._cancelled_at
        if self._step == 0 and waited >= self.ladder.raise_after_s:
            self._step = 1
            with self._ladder_lock:
                if self.observed.is_set():
                    return
                self.force()
            self._record("raise CancellationError into the job's stages", waited)
        elif self._step == 1 and waited >= self.ladder.kill_after_s:
            self._step = 2
            self._record("kill the worker child", waited)
            log.error("job %s ignored its cancel for %.1fs: killing this child", self.job_id, waited)
            try:
                self.before_kill()
            except Exception:
                log.exception("job %s: before the kill", self.job_id)
            os.kill(os.getpid(), signal.SIGKILL)

    def _record(self, step: str, waited: float) -> None:
        with session_scope() as session:
            job_rows.add_event(session, self.job_id, EventKind.ESCALATED,
                               reason=self.token.reason.value if self.token.reason else None,
                               source=self.token.source.value if self.token.source else None,
                               detail={"step": step, "after_s": round(waited, 3)})
