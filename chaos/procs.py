"""The embedded stack the chaos run drives: its own Redis, migrations, two (or more) prefork workers
with stable node names, the API (uvicorn) and Flower (basic auth) — all on 127.0.0.1, all children
of this process in their own sessions, and all stopped at the end.

Import only after the environment is set (run.py does): andon's settings are read once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psutil

from api.stack import start_redis, stop_process, wait_until

ROOT = Path(__file__).resolve().parent.parent


def now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Worker:
    """``celery -A tasks.app worker -P prefork -E -n NAME@%h``; restarted under the same name."""

    name: str
    logs: Path
    concurrency: int
    proc: subprocess.Popen | None = None
    starts: int = 0
    #: every pid this worker ever had (main and pool children), for the leftover-process check
    pids: set[int] = field(default_factory=set)

    @property
    def log(self) -> Path:
        return self.logs / f"worker-{self.name}.{self.starts}.log"

    def start(self, timeout: float = 90.0) -> None:
        self.starts += 1
        cmd = [sys.executable, "-m", "celery", "-A", "tasks.app", "worker", "-P", "prefork",
               "-c", str(self.concurrency), "-E", "-n", f"{self.name}@%h", "--without-mingle",
               "--without-gossip", "-l", "INFO"]
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("ab"), stderr=subprocess.STDOUT, cwd=str(ROOT),
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        self.pids.add(self.proc.pid)
        log = self.log
        wait_until(lambda: " ready." in log.read_text(errors="replace"), timeout, f"worker {self.name}",
                   self.proc, log)
        self.remember_children()

    def children(self) -> list[int]:
        if self.proc is None or self.proc.poll() is not None:
            return []
        try:
            pids = [p.pid for p in psutil.Process(self.proc.pid).children()]
        except psutil.Error:
            return []
        self.pids.update(pids)
        return pids

    def remember_children(self) -> None:
        self.children()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class ChaosStack:
    def __init__(self, home: Path, redis_port: int, api_port: int, flower_port: int, flower_auth: str,
                 workers: int = 2, concurrency: int = 2) -> None:
        self.home = home
        self.logs = home / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.redis_port = redis_port
        self.api_port = api_port
        self.flower_port = flower_port
        self.flower_auth = flower_auth
        self.workers = [Worker(f"chaos-{i + 1}", self.logs, concurrency) for i in range(workers)]
        self.redis: subprocess.Popen | None = None
        self.api: subprocess.Popen | None = None
        self.flower: subprocess.Popen | None = None
        self.spawned: set[int] = set()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def flower_url(self) -> str:
        return f"http://127.0.0.1:{self.flower_port}"

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, stdout=(self.logs / f"{name}.log").open("ab"), stderr=subprocess.STDOUT,
                                cwd=str(ROOT), env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                start_new_session=True)
        self.spawned.add(proc.pid)
        return proc

    def start(self) -> None:
        self.start_redis()
        done = subprocess.run([sys.executable, "-c", "from db.migrate import upgrade; upgrade()"], cwd=str(ROOT),
                              stdout=(self.logs / "migrate.log").open("ab"), stderr=subprocess.STDOUT, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"migrations failed (see {self.logs / 'migrate.log'})")
        py = sys.executable
        self.api = self._spawn("api", [py, "-m", "uvicorn", "api.app:app", "--host", "127.0.0.1",
                                       "--port", str(self.api_port), "--log-level", "warning"])
        self.flower = self._spawn("flower", [py, "-m", "celery", "-A", "tasks.app", "flower",
                                             f"--port={self.flower_port}", "--address=127.0.0.1",
                                             f"--basic-auth={self.flower_auth}"])
        for worker in self.workers:
            worker.start()
        wait_until(lambda: httpx.get(f"{self.api_url}/healthz", timeout=2).status_code == 200, 60, "api",
                   self.api, self.logs / "api.log")
        user, password = self.flower_auth.split(":", 1)
        wait_until(lambda: httpx.get(f"{self.flower_url}/healthcheck", auth=(user, password),
                                     timeout=2).status_code == 200, 60, "flower", self.flower,
                   self.logs / "flower.log")

    def start_redis(self) -> None:
        self.redis = start_redis(self.redis_port, self.home / "redis", self.logs / "redis.log")
        self.spawned.add(self.redis.pid)

    def restart_redis(self, down_s: float = 0.0) -> tuple[datetime, datetime]:
        """SIGTERM the server (it writes its append-only file), start it again on the same port and dir."""
        down = now()
        stop_process(self.redis, signal.SIGTERM, timeout=20)
        time.sleep(down_s)
        self.start_redis()
        return down, now()

    def restart_worker(self, worker: Worker, timeout: float = 60.0) -> dict:
        """Warm restart: SIGTERM the main process, wait for it to exit, start it under the same name."""
        worker.remember_children()
        began = now()
        t0 = time.monotonic()
        worker.proc.send_signal(signal.SIGTERM)
        try:
            code = worker.proc.wait(timeout)
            warm = True
        except subprocess.TimeoutExpired:
            warm = False
            stop_process(worker.proc, signal.SIGKILL, timeout=5)
            code = worker.proc.returncode
        exited = now()
        took = time.monotonic() - t0
        # a warm shutdown leaves no pool child behind; make sure before starting the next one
        try:
            os.killpg(worker.proc.pid, 0)
            leftovers = True
        except ProcessLookupError:
            leftovers = False
        except PermissionError:
            leftovers = True
        if leftovers:  # recorded (the harness reports it), then cleared so the restart is clean
            try:
                os.killpg(worker.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        worker.start()
        return {"worker": worker.name, "began": began, "exited": exited, "ready": now(), "exit_code": code,
                "warm": warm, "exit_s": took, "group_left_behind": leftovers}

    def all_pids(self) -> set[int]:
        pids = set(self.spawned)
        for worker in self.workers:
            worker.remember_children()
            pids |= worker.pids
        return pids

    def stop(self) -> None:
        """Workers first (warm), then the front ends, Redis last."""
        for worker in self.workers:
            if worker.proc is not None:
                worker.remember_children()
                stop_process(worker.proc, signal.SIGTERM, timeout=30)
        for proc in (self.api, self.flower):
            if proc is not None:
                stop_process(proc, signal.SIGTERM, timeout=10)
        if self.redis is not None:
            stop_process(self.redis, signal.SIGTERM, timeout=10)


def leftover_processes(home: Path, known: set[int]) -> list[str]:
    """Processes still alive that we started: by pid, or by carrying our ANDON_HOME in their env."""
    found = []
    me = os.getpid()
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        if proc.info["pid"] == me or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        ours = proc.info["pid"] in known
        if not ours:
            try:
                ours = proc.environ().get("ANDON_HOME") == str(home)
            except psutil.Error:
                continue
        if ours:
            found.append(f"pid {proc.info['pid']}: {' '.join(proc.info['cmdline'] or [])[:160]}")
    return found
