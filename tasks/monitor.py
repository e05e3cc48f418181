"""A watchdog thread beside each running job: heartbeat, and memory ceiling.

It runs in the worker child next to the job's own thread, so it keeps beating while a stage waits
on I/O. A job whose heartbeat key expires is presumed lost (child killed, host gone) and the reaper
finalizes it. Like any Python thread it can't run while another thread holds the GIL in a C call
that never releases it; then the heartbeat stops too, and the job is treated as lost.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time

import psutil

from tasks.errors import AndonError
from tasks.store import get_redis
from tasks.token import CancellationToken
from tasks.vocabulary import CancellationReason, CancellationSource, EventKind

log = logging.getLogger(__name__)


def heartbeat_key(job_id: str) -> str:
    return f"andon:heartbeat:{job_id}"


class JobMonitor:
    """Beats every ``interval_s`` (key TTL: 3 beats) and cancels the job above ``max_rss_mb``.

    Memory escalation: first a cooperative ``resource_limit`` cancel; if the job is still running
    ``grace_s`` later and still over the ceiling, the child kills itself so memory is returned, and
    the worker's main process finalizes the row from the token's reason.
    """

    def __init__(self, job_id: str, token: CancellationToken, interval_s: float,
                 max_rss_mb: float | None, grace_s: float) -> None:
        self.job_id = job_id
        self.token = token
        self.interval_s = interval_s
        self.max_rss_mb = max_rss_mb
        self.grace_s = grace_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"andon-monitor-{job_id[:8]}", daemon=True)
        self._over_since: float | None = None
        #: (item index, stage) the job is at; written by the job thread, published with each beat.
        self.position: tuple[int, str] | None = None

    def start(self) -> JobMonitor:
        self.beat()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 1)
        get_redis().delete(heartbeat_key(self.job_id))

    def beat(self) -> None:
        item, stage = self.position or (None, None)
        value = json.dumps({"pid": os.getpid(), "item": item, "stage": stage})
        get_redis().set(heartbeat_key(self.job_id), value, px=int(self.interval_s * 3000))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
                if self.max_rss_mb:
                    self._check_memory()
            except Exception:
                log.exception("job monitor for %s", self.job_id)

    def _check_memory(self) -> None:
        rss_mb = psutil.Process().memory_info().rss / 2**20
        if rss_mb <= self.max_rss_mb:
            self._over_since = None
            return
        now = time.monotonic()
        if self._over_since is None:
            self._over_since = now
            from tasks.control import request_cancel

            try:
                request_cancel(self.job_id, CancellationReason.RESOURCE_LIMIT,
                               f"RSS {rss_mb:.0f} MiB above the {self.max_rss_mb:g} MiB ceiling",
                               CancellationSource.MEMORY_WATCHDOG, actor=f"pid:{os.getpid()}")
            except AndonError:
                pass
        elif now - self._over_since >= self.grace_s:
            from db import jobs as job_rows
            from db.session import session_scope

            with session_scope() as session:
                job_rows.add_event(session, self.job_id, EventKind.ESCALATED, reason="resource_limit",
                                   source="memory_watchdog",
                                   detail={"step": "kill child", "rss_mb": round(rss_mb), "after_s": self.grace_s})
            log.error("job %s still at %.0f MiB %.1fs after cancel: killing this child", self.job_id, rss_mb,
                      self.grace_s)
            os.kill(os.getpid(), signal.SIGKILL)
