"""The embedded stack the chaos run drives: its own Redis, migrations, two (or more) prefork workers
with stable node names, the API (uvicorn) and Flower (basic auth) — all on 127.0.0.1, all children
of this process in their own sessions (started by ``api.supervisor``), and all stopped at the end.

``configure_env`` runs before any andon module reads its settings (they are read once).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import psutil

from api.supervisor import Service, api_service, flower_service, redis_service, stop_process, worker_service
from chaos.console import now

ROOT = Path(__file__).resolve().parent.parent


def configure_env(home: Path, redis_port: int, flower_auth: str, database_url: str | None = None,
                  policy: str | None = None, max_policy_resumes: int = 3) -> None:
    """Before any andon import: its settings are read once (lru_cache)."""
    from db.settings import embedded_env

    os.environ.update(
        embedded_env(home, redis_port),
        ANDON_FLOWER_BASIC_AUTH=flower_auth,
        ANDON_AUTO_RESUME="1",
        # the stream storm opens up to 200 streams from one client: the cap must not be what it probes
        ANDON_MAX_STREAMS="256",
        # lost messages are looked for every 2 s and re-sent after 5 s: within the harness's drain
        ANDON_BROKER_SWEEP_S="2",
        ANDON_LOST_MESSAGE_AFTER_S="5",
        # a message delivered but unacked this long (its worker died) counts as lost for a queued job
        ANDON_PARKED_AFTER_S="20",
        # a job that ended this long ago gets the Celery state its row implies if its run couldn't write it
        ANDON_RESULT_SETTLE_AFTER_S="5",
        # issue 13: per-reason policy (timeout → auto_resume) for every process of the stack
        ANDON_MAX_POLICY_RESUMES=str(max_policy_resumes),
    )
    if policy:
        os.environ["ANDON_POLICY"] = policy
    else:
        os.environ.pop("ANDON_POLICY", None)
    if database_url:  # the Postgres phase: the same stack over a real PostgreSQL
        os.environ["ANDON_DATABASE_URL"] = database_url
    for var in ("ANDON_API_TOKEN", "ANDON_API_TOKENS", "ANDON_API_URL", "ANDON_JOB_TIME_LIMIT_S",
                "ANDON_JOB_SOFT_TIME_LIMIT_S", "ANDON_MAX_JOB_RSS_MB", "ANDON_HEARTBEAT_S",
                "ANDON_TERMINATE_GRACE_S", "ANDON_ESCALATE_AFTER_S", "ANDON_KILL_AFTER_S"):
        os.environ.pop(var, None)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)


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
        service = worker_service(f"{self.name}@%h", self.log, self.concurrency, cwd=ROOT,
                                 name=f"worker {self.name}").start(wait=False)
        self.proc = service.proc
        self.pids.add(self.proc.pid)
        service.wait_ready(timeout)
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
        self.services: dict[str, Service] = {}
        self.redis_paused = False

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def flower_url(self) -> str:
        return f"http://127.0.0.1:{self.flower_port}"

    def _spawn(self, service: Service) -> subprocess.Popen:
        self.services[service.name] = service.start(wait=False)
        self.spawned.add(service.pid)
        return service.proc

    def start(self) -> None:
        self.start_redis()
        migrate_log = self.logs / "migrate.log"
        with migrate_log.open("ab") as log:
            done = subprocess.run([sys.executable, "-c", "from db.migrate import upgrade; upgrade()"], cwd=str(ROOT),
                                  stdout=log, stderr=subprocess.STDOUT, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"migrations failed (see {migrate_log})")
        self.api = self._spawn(api_service(self.api_port, self.logs / "api.log", "warning", cwd=ROOT))
        self.flower = self._spawn(flower_service(self.flower_port, self.logs / "flower.log", self.flower_auth,
                                                 cwd=ROOT))
        for worker in self.workers:
            worker.start()
        self.services["api"].wait_ready(60)
        self.services["flower"].wait_ready(60)

    def start_redis(self) -> None:
        service = redis_service(self.redis_port, self.home / "redis", self.logs / "redis.log")
        self.services["redis"] = service.start()
        self.redis = service.proc
        self.spawned.add(self.redis.pid)

    def restart_redis(self, down_s: float = 0.0) -> tuple[datetime, datetime]:
        """SIGTERM the server (it writes its append-only file), start it again on the same port and dir."""
        down = now()
        stop_process(self.redis, signal.SIGTERM, timeout=20)
        time.sleep(down_s)
        self.start_redis()
        return down, now()

    def pause_redis(self, seconds: float) -> tuple[datetime, datetime]:
        """SIGSTOP the server for ``seconds`` (its clients' sockets stay open, every call just hangs),
        then SIGCONT. The SIGCONT is sent whatever happens (``stop`` sends one too)."""
        pid = self.redis.pid
        began = now()
        os.kill(pid, signal.SIGSTOP)
        self.redis_paused = True
        try:
            time.sleep(seconds)
        finally:
            os.kill(pid, signal.SIGCONT)
            self.redis_paused = False
        return began, now()

    def hold_db_lock(self, seconds: float, database_url: str) -> tuple[datetime, datetime]:
        """Another process takes the database's write lock and holds it for ``seconds``: SQLite's
        ``BEGIN IMMEDIATE`` (longer than andon's 10 s busy timeout), or on Postgres an EXCLUSIVE lock
        on the job tables (reads go on, every write waits)."""
        if database_url.startswith("sqlite"):
            path = database_url.split("///", 1)[1]
            code = ("import sqlite3, sys, time\n"
                    "c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)\n"
                    "c.execute('BEGIN IMMEDIATE')\n"
                    "print('locked', flush=True)\n"
                    "time.sleep(float(sys.argv[2]))\n"
                    "c.execute('ROLLBACK')\n")
            argv = [sys.executable, "-c", code, path, str(seconds)]
        else:
            code = ("import psycopg, sys, time\n"
                    "url = sys.argv[1].replace('postgresql+psycopg://', 'postgresql://')\n"
                    "c = psycopg.connect(url)\n"
                    "c.execute('LOCK TABLE jobs, job_items, job_events IN EXCLUSIVE MODE')\n"
                    "print('locked', flush=True)\n"
                    "time.sleep(float(sys.argv[2]))\n"
                    "c.rollback()\n")
            argv = [sys.executable, "-c", code, database_url, str(seconds)]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT))
        self.spawned.add(proc.pid)
        try:
            line = proc.stdout.readline()  # blocks until the lock is held (it may queue behind a writer)
            began = now()
            if line.strip() != "locked":
                raise RuntimeError(f"the lock holder did not get its lock: {line!r} {proc.stderr.read()[-500:]}")
            code_ = proc.wait(timeout=seconds + 30)
            ended = now()
            if code_ != 0:
                raise RuntimeError(f"the lock holder exited {code_}: {proc.stderr.read()[-500:]}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        return began, ended

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
        if self.redis is not None and self.redis.poll() is None:
            try:  # a paused Redis (SIGSTOP) would make every warm shutdown wait on it
                os.kill(self.redis.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        for worker in self.workers:
            if worker.proc is not None:
                worker.remember_children()
                stop_process(worker.proc, signal.SIGTERM, timeout=30)
        for proc in (self.api, self.flower):
            if proc is not None:
                stop_process(proc, signal.SIGTERM, timeout=10)
        if self.redis is not None:
            stop_process(self.redis, signal.SIGTERM, timeout=10)


def leftover_processes(home: Path, known: set[int], pg_dir: Path | None = None) -> list[str]:
    """Processes still alive that we started: by pid, or by carrying our ANDON_HOME in their env, or
    (Postgres phase) a postgres serving our throwaway cluster's data dir."""
    found = []
    me = os.getpid()
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        if proc.info["pid"] == me or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        ours = proc.info["pid"] in known or (
            pg_dir is not None and str(pg_dir) in " ".join(proc.info["cmdline"] or []))
        if not ours:
            try:
                ours = proc.environ().get("ANDON_HOME") == str(home)
            except psutil.Error:
                continue
        if ours:
            found.append(f"pid {proc.info['pid']}: {' '.join(proc.info['cmdline'] or [])[:160]}")
    return found
