"""Real processes for tests: a prefork Celery worker subprocess, and waiting helpers."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from api.supervisor import ServiceError, worker_service


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.02, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; return it, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class WorkerProcess:
    """``celery -A tasks.app worker -P prefork -E`` as a real subprocess with its own log file
    (``api.supervisor.worker_service``; its log is emptied at each start)."""

    def __init__(self, name: str, log_dir: Path, concurrency: int = 2, env: dict[str, str] | None = None,
                 extra_args: list[str] | None = None) -> None:
        self.name = name
        self.log = log_dir / f"worker-{name}.log"
        self.concurrency = concurrency
        self.service = worker_service(f"{name}@%h", self.log, concurrency, extra=extra_args or [], env=env,
                                      name=f"worker {name}")

    @property
    def proc(self):
        return self.service.proc

    def start(self, timeout: float = 60) -> WorkerProcess:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.log.write_text("")
        try:
            self.service.start(wait=False).wait_ready(timeout)
        except ServiceError as exc:
            raise AssertionError(f"worker {self.name} did not start (log {self.log}): {exc}") from exc
        return self

    def child_pids(self) -> list[int]:
        import psutil

        return [p.pid for p in psutil.Process(self.proc.pid).children()]

    def send_signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        return self.service.stop(sig, timeout)

    def logs(self) -> str:
        return self.log.read_text()
