"""Real processes for tests: a prefork Celery worker subprocess, and waiting helpers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from api.stack import stop_process


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
    """``celery -A tasks.app worker -P prefork -E`` as a real subprocess with its own log file."""

    def __init__(self, name: str, log_dir: Path, concurrency: int = 2, env: dict[str, str] | None = None,
                 extra_args: list[str] | None = None) -> None:
        self.name = name
        self.log = log_dir / f"worker-{name}.log"
        self.concurrency = concurrency
        self.env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> WorkerProcess:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.log.write_text("")
        cmd = [sys.executable, "-m", "celery", "-A", "tasks.app", "worker", "-P", "prefork",
               "-c", str(self.concurrency), "-E", "-n", f"{self.name}@%h", "--without-mingle",
               "--without-gossip", "-l", "INFO", *self.extra_args]
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("a"), stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        wait_for(self._ready, timeout, 0.1, f"worker {self.name} ready (log {self.log})")
        return self

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"worker {self.name} exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        return " ready." in self.log.read_text()

    def child_pids(self) -> list[int]:
        import psutil

        return [p.pid for p in psutil.Process(self.proc.pid).children()]

    def send_signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        stop_process(self.proc, sig, timeout)
        return self.proc.returncode

    def logs(self) -> str:
        return self.log.read_text()
