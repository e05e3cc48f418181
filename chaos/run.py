"""andon's reliability harness: ``make chaos`` (or ``.venv/bin/python chaos/run.py``).

Starts its own embedded stack (Redis, migrations, two prefork workers with stable node names, the
API, Flower behind basic auth — all on 127.0.0.1 under a fresh temporary ANDON_HOME) and then:

1. chaos: submits a few hundred jobs through the API over time, and while they run cancels them at
   random through the API, the CLI, Flower's Revoke and Terminate, SIGKILLs worker pool children
   mid-job, warm-restarts workers (same node name, auto-resume on) and restarts Redis once;
2. race: a thousand one-item jobs, each cancelled a random moment after its submit (cancel vs
   complete);
3. checks every row (see chaos/checks.py and docs/chaos.md), prints a report, stops everything,
   and exits 1 on any violation (2 if the harness itself could not run).

    --jobs N --race N    sizes (default 320 and 1000); --quick: 80 and 200
    --seed N             random seed (default: time-based, printed)
    --keep               keep the temporary ANDON_HOME (logs, database) even when everything passed
    --budget-s S         hard bound on the whole run (default 600 s)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python chaos/run.py` puts chaos/ first, not the repo root

REASONS = ["user_requested", "timeout", "system_shutdown", "resource_limit", "dependency_failed"]
ACTIVE = ("pending", "running", "cancelling")


@dataclass
class Plan:
    jobs: int = 320
    race: int = 1000
    workers: int = 2
    concurrency: int = 2
    min_docs: int = 3
    max_docs: int = 15
    min_delay_s: float = 0.02
    max_delay_s: float = 0.1
    deadline_share: float = 0.15
    in_flight: int = 8  # harness jobs pending or running at a time (4 pool slots: about half queued)
    action_every_s: float = 0.3
    #: action mix (relative weights)
    weights: tuple = (("api_cancel", 36), ("cli_cancel", 10), ("flower_revoke", 16), ("flower_terminate", 14),
                      ("sigkill", 14), ("nothing", 10))
    #: disruptions, each when this share of the jobs has been submitted
    #: (the Redis restart follows the second worker restart at once: it lands while that worker,
    #: just back, auto-resumes what its shutdown stopped — a host reboot does no better)
    disruptions: tuple = ((0.2, "restart:chaos-1"), (0.45, "restart:chaos-2"), (0.45, "redis"),
                          (0.75, "restart:chaos-1"))
    redis_down_s: float = 2.0  # how long Redis stays away (heartbeat keys live 3 × 2 s)
    race_threads: int = 4
    race_max_offset_s: float = 0.03  # after the job is seen running (its one item takes ~20–70 ms)
    race_max_delay_s: float = 0.15  # after submit (it starts ~40–130 ms after its submit)
    budget_s: float = 600.0

    @classmethod
    def quick(cls) -> Plan:
        return cls(jobs=80, race=200)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def configure_env(home: Path, redis_port: int, flower_auth: str) -> None:
    """Before any andon import: its settings are read once (lru_cache)."""
    from db.settings import embedded_env

    os.environ.update(
        embedded_env(home, redis_port),
        ANDON_FLOWER_BASIC_AUTH=flower_auth,
        ANDON_AUTO_RESUME="1",
    )
    for var in ("ANDON_API_TOKEN", "ANDON_API_TOKENS", "ANDON_API_URL", "ANDON_JOB_TIME_LIMIT_S",
                "ANDON_JOB_SOFT_TIME_LIMIT_S", "ANDON_MAX_JOB_RSS_MB", "ANDON_HEARTBEAT_S",
                "ANDON_TERMINATE_GRACE_S", "ANDON_ESCALATE_AFTER_S", "ANDON_KILL_AFTER_S"):
        os.environ.pop(var, None)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)


def now() -> datetime:
    return datetime.now(UTC)


def say(msg: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fmt_s(seconds: float) -> str:
    return f"{int(seconds // 60)}m{seconds % 60:04.1f}s" if seconds >= 60 else f"{seconds:.1f}s"


class Transient(Exception):
    """A call that may succeed if retried (a 5xx, a refused connection, Redis or the database away)."""


class Harness:
    def __init__(self, plan: Plan, seed: int, home: Path, ports: dict[str, int], flower_auth: str) -> None:
        import httpx

        from chaos.checks import Record
        from chaos.procs import ChaosStack

        self.plan = plan
        self.seed = seed
        self.rng = random.Random(seed)
        self.rng_lock = threading.Lock()
        self.home = home
        self.stack = ChaosStack(home, ports["redis"], ports["api"], ports["flower"], flower_auth,
                                workers=plan.workers, concurrency=plan.concurrency)
        self.flower_auth = tuple(flower_auth.split(":", 1))
        self.record = Record()
        self.lock = threading.Lock()
        self.stop_actions = threading.Event()
        self.active: dict[str, str] = {}  # job id -> status, for every non-terminal job in the database
        self.redis_down = threading.Event()
        self.restarting: set[str] = set()
        self.given_up: set[str] = set()
        self.celery_meta: dict[str, dict] = {}
        self.notes: list[str] = []  # harness-level findings (become "harness"/"processes" violations)
        self.timeline: list[str] = []
        self.local = threading.local()
        self.httpx = httpx
        self.cli = self._cli_command()
        self.phase_times: dict[str, float] = {}
        self.t0 = time.monotonic()

    # -- small utilities -----------------------------------------------------------------------------

    def rand(self, fn, *args):
        with self.rng_lock:
            return getattr(self.rng, fn)(*args)

    def client(self):
        if not hasattr(self.local, "client"):
            self.local.client = self.httpx.Client(timeout=20)
        return self.local.client

    @staticmethod
    def _cli_command() -> list[str]:
        script = Path(sys.executable).parent / "andon"
        return [str(script)] if script.exists() else [sys.executable, "-m", "api.cli"]

    def retry(self, what: str, fn, timeout: float = 45.0):
        """Call ``fn`` until it stops raising Transient / connection errors, for at most ``timeout`` s."""
        from redis.exceptions import RedisError
        from sqlalchemy.exc import OperationalError

        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            try:
                return fn()
            except (Transient, self.httpx.TransportError, RedisError, OperationalError) as exc:
                with self.lock:
                    self.record.transient[f"{what}: {type(exc).__name__}"] += 1
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{what}: still failing after {timeout:.0f}s: {exc}") from exc
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def note(self, msg: str) -> None:
        with self.lock:
            self.notes.append(msg)
        say(f"NOTE: {msg}")

    def mark(self, msg: str) -> None:
        with self.lock:
            self.timeline.append(f"{fmt_s(time.monotonic() - self.t0)}  {msg}")
        say(msg)

    # -- the stack -----------------------------------------------------------------------------------

    def start(self) -> None:
        self.t0 = time.monotonic()
        say(f"starting the stack in {self.home} (seed {self.seed})")
        self.stack.start()
        self.phase_times["start"] = time.monotonic() - self.t0
        say(f"stack up in {self.phase_times['start']:.1f}s: API {self.stack.api_url}, Flower "
            f"{self.stack.flower_url}, workers {', '.join(w.name for w in self.stack.workers)}")

    # -- reading state -------------------------------------------------------------------------------

    def poll_active(self) -> None:
        from sqlalchemy import select

        from db.models import Job
        from db.session import session_scope

        with session_scope() as session:
            rows = session.execute(select(Job.id, Job.status).where(Job.status.in_(ACTIVE))).all()
        with self.lock:
            self.active = dict(rows)

    def poller(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.poll_active()
            except Exception as exc:  # the database is local; a lock timeout is worth retrying
                with self.lock:
                    self.record.transient[f"poll: {type(exc).__name__}"] += 1
            stop.wait(0.2)

    def in_flight(self) -> int:
        with self.lock:
            return sum(1 for j in self.active if self.record.submitted.get(j, {}).get("phase") == "chaos")

    # -- phase 1: the workload -----------------------------------------------------------------------

    def documents(self) -> list[str]:
        n = self.rand("randint", self.plan.min_docs, self.plan.max_docs)
        tag = self.rand("randrange", 10**6)
        return [f"Chaos document {tag}-{i}. The quick brown fox jumps over the lazy dog. Foxes are quick."
                for i in range(n)]

    def submit_one(self) -> str:
        body = {"documents": self.documents(),
                "options": {"stage_delay_s": round(self.rand("uniform", self.plan.min_delay_s,
                                                            self.plan.max_delay_s), 3)}}
        if self.rand("random") < self.plan.deadline_share:
            body["deadline_s"] = round(self.rand("uniform", 0.4, 3.0), 2)

        def post():
            answer = self.client().post(f"{self.stack.api_url}/api/jobs", json=body)
            if answer.status_code >= 500:
                with self.lock:
                    self.record.submit_errors.append(f"{answer.status_code} {answer.text[:200]}")
                raise Transient(f"submit answered {answer.status_code}")
            if answer.status_code != 202:
                raise RuntimeError(f"submit answered {answer.status_code}: {answer.text[:300]}")
            return answer.json()["job_id"]

        job_id = self.retry("submit", post)
        with self.lock:
            self.record.submitted[job_id] = {"phase": "chaos", "deadline_s": body.get("deadline_s"),
                                             "docs": len(body["documents"])}
            self.active.setdefault(job_id, "pending")
        return job_id

    def submitter(self) -> None:
        deadline = time.monotonic() + self.plan.budget_s * 0.5
        while len(self.submitted("chaos")) < self.plan.jobs:
            if time.monotonic() > deadline:
                self.note(f"submitting stopped at {len(self.submitted('chaos'))} jobs: out of time")
                return
            if self.in_flight() < self.plan.in_flight:
                self.submit_one()
                time.sleep(self.rand("uniform", 0.02, 0.12))
            else:
                time.sleep(0.05)

    def submitted(self, phase: str) -> list[str]:
        with self.lock:
            return [j for j, m in self.record.submitted.items() if m["phase"] == phase]

    # -- phase 1: the actions ------------------------------------------------------------------------

    def acted_on(self) -> set[str]:
        with self.lock:
            return {a.job_id for a in self.record.actions}

    def pick_cancel_target(self) -> str | None:
        with self.lock:
            ours = {j: s for j, s in self.active.items() if self.record.submitted.get(j, {}).get("phase") == "chaos"}
        if not ours:
            return None
        acted = self.acted_on()
        running = [j for j, s in ours.items() if s == "running"]
        again = [j for j in ours if j in acted]
        roll = self.rand("random")
        if again and roll < 0.15:
            pool = again  # a second stop path on a job already asked to stop: first cancel must win
        elif running and roll < 0.85:
            pool = running
        else:
            pool = list(ours)
        return self.rand("choice", sorted(pool))

    def pick_long_target(self) -> str | None:
        """A job that will still be running in a second or two (the CLI takes that long to start)."""
        from sqlalchemy import select

        from db.models import Job
        from db.session import session_scope

        with self.lock:
            ours = [j for j in self.active if self.record.submitted.get(j, {}).get("phase") == "chaos"]
        if not ours:
            return None
        with session_scope() as session:
            rows = session.execute(select(Job.id, Job.status, Job.total_items, Job.completed_items, Job.options)
                                   .where(Job.id.in_(ours))).all()
        left = {j: (total - done) * 3 * float((options or {}).get("stage_delay_s") or 0) + (
                    2.0 if status == "pending" else 0.0)
                for j, status, total, done, options in rows if status in ("pending", "running")}
        if not left:
            return None
        longest = sorted(left, key=left.get, reverse=True)[:3]
        return self.rand("choice", sorted(longest))

    def act(self, kind: str) -> None:
        if kind == "nothing":
            return
        if kind == "sigkill":
            return self.sigkill()
        job_id = self.pick_long_target() if kind == "cli_cancel" else self.pick_cancel_target()
        if job_id is None:
            return
        from chaos.checks import Act

        if kind == "api_cancel":
            reason = self.rand("choice", REASONS)
            act = Act(kind, job_id, now(), reason, "api")
        elif kind == "cli_cancel":
            reason = self.rand("choice", REASONS)
            act = Act(kind, job_id, now(), reason, "cli")
        else:
            act = Act(kind, job_id, now(), "user_requested", "revoke")
        with self.lock:
            self.record.actions.append(act)  # recorded before it is sent: the job may see it at once
        try:
            act.result = getattr(self, f"do_{kind}")(job_id, act.reason)
        except Exception as exc:
            act.result = f"error: {exc}"
            self.note(f"{kind} on {job_id} failed: {exc}")

    def do_api_cancel(self, job_id: str, reason: str) -> str:
        def post():
            answer = self.client().post(f"{self.stack.api_url}/api/jobs/{job_id}/cancel",
                                        json={"reason": reason, "message": "chaos: api"})
            if answer.status_code >= 500:
                raise Transient(f"cancel answered {answer.status_code}")
            return answer

        answer = self.retry("api cancel", post)
        if answer.status_code == 202:
            return "accepted"
        if answer.status_code == 400 and "already" in answer.text:
            return "terminal"
        raise RuntimeError(f"cancel answered {answer.status_code}: {answer.text[:200]}")

    def do_cli_cancel(self, job_id: str, reason: str) -> str:
        def run():
            done = subprocess.run([*self.cli, "cancel", job_id, "--reason", reason, "--message", "chaos: cli"],
                                  capture_output=True, text=True, timeout=90, cwd=str(ROOT))
            if done.returncode == 0:
                return "accepted"
            if "already" in done.stderr:
                return "terminal"
            if "cannot reach Redis" in done.stderr or "database error" in done.stderr:
                raise Transient(done.stderr.strip()[:200])
            raise RuntimeError(f"andon cancel exited {done.returncode}: {done.stderr.strip()[:300]}")

        return self.retry("cli cancel", run, timeout=90)

    def _flower_revoke(self, job_id: str, terminate: bool) -> str:
        def post():
            answer = self.client().post(f"{self.stack.flower_url}/api/task/revoke/{job_id}",
                                        data={"terminate": "true" if terminate else "false", "signal": "SIGTERM"},
                                        auth=self.flower_auth)
            if answer.status_code != 200:
                raise Transient(f"flower revoke answered {answer.status_code}")
            return "accepted"

        return self.retry("flower revoke", post)

    def do_flower_revoke(self, job_id: str, _reason: str) -> str:
        return self._flower_revoke(job_id, terminate=False)

    def do_flower_terminate(self, job_id: str, _reason: str) -> str:
        return self._flower_revoke(job_id, terminate=True)

    def sigkill(self) -> None:
        """SIGKILL the pool child running a job (its heartbeat names the pid)."""
        from chaos.checks import Act
        from tasks.monitor import heartbeat_key
        from tasks.store import get_redis

        if self.redis_down.is_set():
            return
        with self.lock:
            running = [j for j, s in self.active.items() if s == "running"]
            killed = Counter(a.job_id for a in self.record.actions if a.kind == "sigkill")
        if not running:
            return
        children = {}
        for worker in self.stack.workers:
            if worker.name in self.restarting or not worker.alive():
                continue
            for pid in worker.children():
                children[pid] = worker.name
        try:
            beats = get_redis().mget([heartbeat_key(j) for j in running])
        except Exception:
            return
        pids = {}
        for job_id, beat in zip(running, beats):
            if beat is None:
                continue
            pid = json.loads(beat).get("pid")
            if pid in children and killed[job_id] < 2:
                pids[job_id] = pid
        if not pids:
            return
        twice = [j for j in pids if killed[j] == 1]
        pool = twice if twice and self.rand("random") < 0.5 else sorted(pids)
        job_id = self.rand("choice", sorted(pool))
        act = Act("sigkill", job_id, now(), pid=pids[job_id])
        with self.lock:
            self.record.actions.append(act)
        try:
            os.kill(pids[job_id], signal.SIGKILL)
            act.result = f"killed pid {pids[job_id]} of {children[pids[job_id]]}"
        except ProcessLookupError:
            act.result = "pid gone"

    def actor(self, pool: ThreadPoolExecutor) -> None:
        kinds, weights = zip(*self.plan.weights)
        busy: list = []
        while not self.stop_actions.is_set():
            self.stop_actions.wait(self.plan.action_every_s * self.rand("uniform", 0.5, 1.5))
            busy = [f for f in busy if not f.done()]
            if len(busy) >= 6:
                continue  # don't pile up calls during an outage
            kind = self.rand("choices", kinds, weights)[0]
            busy.append(pool.submit(self._guarded, kind))

    def _guarded(self, kind: str) -> None:
        try:
            self.act(kind)
        except Exception:
            self.note(f"action {kind} crashed:\n{traceback.format_exc()}")

    # -- phase 1: disruptions ------------------------------------------------------------------------

    def disruptor(self) -> None:
        for share, what in self.plan.disruptions:
            target = int(self.plan.jobs * share)
            deadline = time.monotonic() + self.plan.budget_s * 0.5
            while len(self.submitted("chaos")) < target and time.monotonic() < deadline:
                time.sleep(0.1)
            # only disrupt while something runs, so the disruption lands on jobs
            until = time.monotonic() + (0 if what == "redis" else 10)
            while time.monotonic() < until and not any(s == "running" for s in dict(self.active).values()):
                time.sleep(0.05)
            try:
                if what == "redis":
                    self.restart_redis()
                else:
                    self.restart_worker(what.split(":", 1)[1])
            except Exception as exc:
                self.note(f"disruption {what} failed: {exc}\n{traceback.format_exc()}")

    def restart_worker(self, name: str) -> None:
        worker = next(w for w in self.stack.workers if w.name == name)
        with self.lock:
            running = sum(1 for s in self.active.values() if s == "running")
            self.restarting.add(name)
        try:
            info = self.stack.restart_worker(worker)
        finally:
            with self.lock:
                self.restarting.discard(name)
        info["share"] = len(self.submitted("chaos")) / self.plan.jobs
        with self.lock:
            self.record.restarts.append(info)
        if not info["warm"]:
            self.note(f"worker {name} did not exit within 60s of SIGTERM (killed)")
        if info["exit_code"] not in (0, None):
            self.note(f"worker {name} exited with code {info['exit_code']} on a warm shutdown")
        if info["group_left_behind"]:
            self.note(f"worker {name}'s process group outlived its warm shutdown")
        self.mark(f"warm restart of {name}: exited in {info['exit_s']:.1f}s (code {info['exit_code']}), "
                  f"ready again after {(info['ready'] - info['began']).total_seconds():.1f}s "
                  f"({running} jobs were running on the stack)")

    def restart_redis(self) -> None:
        self.redis_down.set()
        try:
            down, up = self.stack.restart_redis(self.plan.redis_down_s)
        finally:
            self.redis_down.clear()
        with self.lock:
            self.record.redis_restart = (down, up)
        self.mark(f"Redis restarted (SIGTERM, same port and data dir): down {(up - down).total_seconds():.1f}s")

    # -- waiting ---------------------------------------------------------------------------------------

    def waiting_on(self) -> dict[str, str]:
        """Non-terminal jobs the harness submitted or andon made itself (auto-resume), and any other row a
        worker has taken up. A row left ``pending`` by a submit that answered 5xx (an "orphan", never
        enqueued) is not waited for: the checks report it."""
        from sqlalchemy import select

        from db.models import Job
        from db.session import session_scope

        with self.lock:
            active = dict(self.active)
            known = set(self.record.submitted)
        unknown = [j for j in active if j not in known]
        if unknown:
            with session_scope() as session:
                resumed = set(session.scalars(select(Job.id).where(Job.id.in_(unknown),
                                                                   Job.resumed_from.is_not(None))))
            known |= resumed
        return {j: s for j, s in active.items() if j in known or s != "pending"}

    def wait_terminal(self, timeout: float, what: str) -> bool:
        deadline = time.monotonic() + timeout
        left: dict[str, str] = {}
        while time.monotonic() < deadline:
            try:
                self.poll_active()
                left = {j: s for j, s in self.waiting_on().items() if j not in self.given_up}
            except Exception:
                time.sleep(0.2)
                continue
            if not left:
                return True
            time.sleep(0.25)
        self.given_up |= set(left)  # reported by the checks ("non-terminal"); not waited for again
        self.note(f"{what}: {len(left)} jobs still not terminal after {timeout:.0f}s: "
                  f"{dict(Counter(left.values()))}")
        return False

    # -- phase 1 driver --------------------------------------------------------------------------------

    def run_chaos(self) -> None:
        started = time.monotonic()
        self.mark(f"phase 1: {self.plan.jobs} jobs through the API, random cancels, kills, restarts")
        stop_poll = threading.Event()
        poller = threading.Thread(target=self.poller, args=(stop_poll,), daemon=True)
        poller.start()
        pool = ThreadPoolExecutor(max_workers=6, thread_name_prefix="chaos-act")
        actor = threading.Thread(target=self.actor, args=(pool,), daemon=True)
        disruptor = threading.Thread(target=self.disruptor, daemon=True)
        actor.start()
        disruptor.start()
        try:
            self.submitter()
            disruptor.join(timeout=self.plan.budget_s * 0.3)
            # keep acting until the last jobs are done (bounded)
            until = time.monotonic() + 60
            while time.monotonic() < until and self.in_flight() > 0:
                time.sleep(0.2)
        finally:
            self.stop_actions.set()
            actor.join(timeout=10)
            pool.shutdown(wait=True)
            stop_poll.set()
            poller.join(timeout=5)
        self.phase_times["chaos"] = time.monotonic() - started
        drain = time.monotonic()
        self.wait_terminal(45, "phase 1 drain")
        self.phase_times["chaos drain"] = time.monotonic() - drain
        self.mark(f"phase 1 done: {len(self.submitted('chaos'))} jobs, {len(self.record.actions)} actions")

    # -- phase 2: cancel vs complete -------------------------------------------------------------------

    def run_race(self) -> None:
        if self.plan.race <= 0:
            return
        started = time.monotonic()
        self.mark(f"phase 2: cancel vs complete, {self.plan.race} one-item jobs")
        counts = [self.plan.race // self.plan.race_threads + (i < self.plan.race % self.plan.race_threads)
                  for i in range(self.plan.race_threads)]
        threads = [threading.Thread(target=self._race_thread, args=(n,), daemon=True) for n in counts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=self.plan.budget_s * 0.4)
        self.phase_times["race"] = time.monotonic() - started
        self.wait_terminal(30, "phase 2 drain")
        self.mark(f"phase 2 done in {fmt_s(self.phase_times['race'])}")

    def _race_thread(self, n: int) -> None:
        from api import service
        from chaos.checks import Act
        from db.models import Job
        from db.session import session_scope
        from db.vocabulary import CancellationReason, CancellationSource
        from tasks.errors import JobAlreadyTerminal

        deadline = time.monotonic() + self.plan.budget_s * 0.35
        for i in range(n):
            if time.monotonic() > deadline:
                self.note(f"race thread stopped after {i} of {n} jobs: out of time")
                return
            doc = f"Race document {self.rand('randrange', 10**6)}. Short and quick."
            job_id = self.retry("race submit",
                                lambda: service.submit_job([doc], {}, actor="chaos-race").job_id)
            with self.lock:
                self.record.submitted[job_id] = {"phase": "race", "deadline_s": None, "docs": 1}
            roll = self.rand("random")
            if roll < 0.15:
                how = "at once"
            elif roll < 0.65:  # the real race: cancel while it runs, as it is about to complete
                how = "once running"
                until = time.monotonic() + 10
                while time.monotonic() < until:
                    with session_scope() as session:
                        if session.get(Job, job_id).status != "pending":
                            break
                    time.sleep(0.001)
                time.sleep(self.rand("uniform", 0, self.plan.race_max_offset_s))
            else:
                how = "random offset"
                time.sleep(self.rand("uniform", 0, self.plan.race_max_delay_s))
            with self.lock:
                self.record.submitted[job_id]["how"] = how
            reason = self.rand("choice", REASONS)
            act = Act("race_cancel", job_id, now(), reason, "api")
            with self.lock:
                self.record.actions.append(act)
            try:
                service.cancel_job(job_id, CancellationReason(reason), "chaos: race", CancellationSource.API,
                                   actor="chaos-race")
                act.result = "accepted"
            except JobAlreadyTerminal:
                act.result = "terminal"
            until = time.monotonic() + 30
            while time.monotonic() < until:  # one job in flight per thread: the race is with a running job
                with session_scope() as session:
                    status = session.get(Job, job_id).status
                if status in ("cancelled", "completed", "failed"):
                    break
                time.sleep(0.003)

    # -- checks ----------------------------------------------------------------------------------------

    def load_rows(self):
        from sqlalchemy import select

        from db.models import Job, JobEvent, JobItem
        from db.session import session_scope

        with session_scope() as session:
            jobs = list(session.scalars(select(Job)))
            items = list(session.scalars(select(JobItem)))
            events = list(session.scalars(select(JobEvent)))
            for obj in jobs + items + events:
                session.expunge(obj)
        return jobs, items, events

    def fetch_partials(self, job_ids: list[str]) -> dict[str, dict]:
        out: dict[str, dict] = {}

        def get(job_id: str) -> None:
            def call():
                answer = self.client().get(f"{self.stack.api_url}/api/jobs/{job_id}/partial-results")
                if answer.status_code >= 500:
                    raise Transient(str(answer.status_code))
                return answer

            answer = self.retry("partial-results", call)
            if answer.status_code == 200:
                out[job_id] = answer.json()

        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(get, job_ids))
        return out

    def celery_states(self, jobs: list, settle_s: float = 20.0) -> dict[str, str | None]:
        """Each job's state in Celery's result backend, once the broker queue is drained (a job cancelled
        while queued gets its REVOKED when a worker takes its message off the queue)."""
        from tasks.store import get_redis

        redis = get_redis()
        deadline = time.monotonic() + settle_s
        while time.monotonic() < deadline and self.retry("queue length", lambda: redis.llen("andon")):
            time.sleep(0.25)
        want = {j.id for j in jobs if j.status in ("cancelled", "completed", "failed")}
        states: dict[str, str | None] = {}
        while True:
            missing = sorted(want - {j for j, s in states.items() if s})
            raws = self.retry("result backend", lambda: redis.mget([f"celery-task-meta-{j}" for j in missing])) \
                if missing else []
            for job_id, raw in zip(missing, raws):
                meta = json.loads(raw) if raw else {}
                states[job_id] = meta.get("status")
                result = meta.get("result") if isinstance(meta.get("result"), dict) else {}
                self.celery_meta[job_id] = {"exc_type": result.get("exc_type"), "date_done": meta.get("date_done")}
            if all(states.get(j) for j in want) or time.monotonic() > deadline:
                return states
            time.sleep(0.5)

    def parked_messages(self) -> dict[str, datetime]:
        """Task messages in kombu's ``unacked`` hash once every job is done: delivered to a worker that
        never acked them, so Redis redelivers them only after the visibility timeout (12 h in andon)."""
        from tasks.store import get_redis

        redis = get_redis()
        raw = self.retry("unacked", lambda: redis.hgetall("unacked"))
        index = dict(self.retry("unacked_index", lambda: redis.zrange("unacked_index", 0, -1, withscores=True)))
        parked = {}
        for tag, payload in raw.items():
            try:
                task_id = json.loads(payload)[0]["headers"]["id"]
            except (ValueError, KeyError, IndexError, TypeError):
                continue
            parked[task_id] = datetime.fromtimestamp(index.get(tag, 0), UTC)
        return parked

    def leftover_dirs(self, settle_s: float = 15.0) -> list[str]:
        from db.settings import get_settings

        tmp = get_settings().jobs_tmp_dir
        deadline = time.monotonic() + settle_s
        while True:
            left = sorted(p.name for p in tmp.iterdir()) if tmp.exists() else []
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.25)


# ----------------------------------------------------------------------------------------------------
# The report


def race_how(h: Harness) -> Counter:
    return Counter(m.get("how") for m in h.record.submitted.values() if m["phase"] == "race")


def report(h: Harness, jobs, events, violations, info, race, leftovers_dirs, leftover_procs,
           total_s) -> tuple[str, int]:
    from chaos.checks import CHECKS

    rec = h.record
    lines: list[str] = []
    add = lines.append
    add("=" * 100)
    add(f"andon chaos report — seed {h.seed}, {h.plan.workers} workers × {h.plan.concurrency} pool processes, "
        f"SQLite, ran {fmt_s(total_s)}")
    add("=" * 100)
    chaos_ids = set(h.submitted("chaos"))
    deadline_jobs = sum(1 for j in chaos_ids if rec.submitted[j].get("deadline_s"))
    add(f"phase 1 — chaos: {len(chaos_ids)} jobs submitted through the API ({deadline_jobs} with a deadline_s), "
        f"{h.plan.min_docs}–{h.plan.max_docs} items, stage_delay_s {h.plan.min_delay_s}–{h.plan.max_delay_s}; "
        f"{fmt_s(h.phase_times.get('chaos', 0))} + drain {fmt_s(h.phase_times.get('chaos drain', 0))}")
    acts = [a for a in rec.actions if a.job_id in chaos_ids or a.kind == "sigkill"]
    by_kind: dict[str, Counter] = defaultdict(Counter)
    for a in acts:
        by_kind[a.kind][a.result.split(" ")[0].rstrip(":") if a.result else "?"] += 1
    add("  actions:")
    for kind in ("api_cancel", "cli_cancel", "flower_revoke", "flower_terminate", "sigkill"):
        c = by_kind.get(kind, Counter())
        add(f"    {kind:<18} {sum(c.values()):>4}   " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
    per_job = Counter(a.job_id for a in acts if a.kind != "sigkill")
    kills = Counter(a.job_id for a in acts if a.kind == "sigkill")
    add(f"    jobs asked to stop: {len(per_job)} ({sum(1 for v in per_job.values() if v > 1)} of them by two or "
        f"more harness calls); jobs SIGKILLed: {len(kills)} ({sum(1 for v in kills.values() if v > 1)} twice)")
    for r in rec.restarts:
        add(f"    warm restart of {r['worker']} at {r['share']:.0%} of submits: exit {r['exit_s']:.1f}s "
            f"(code {r['exit_code']}), back under the same name after "
            f"{(r['ready'] - r['began']).total_seconds():.1f}s")
    if rec.redis_restart:
        down, up = rec.redis_restart
        add(f"    Redis restart (SIGTERM, same port and appendonly dir): down {(up - down).total_seconds():.1f}s")
    shutdown = info.get("shutdown-requests", Counter())
    if shutdown:
        add("    jobs asked to stop by a warm shutdown: " + ", ".join(f"{k} {v}" for k, v in sorted(shutdown.items())))
    if rec.transient:
        add("    transient errors the harness retried: " +
            ", ".join(f"{k} ×{v}" for k, v in sorted(rec.transient.items())))
    if rec.submit_errors:
        add(f"    submits answered 5xx (retried as new jobs): {len(rec.submit_errors)}: {rec.submit_errors[0][:120]}")
    origin = info.get("origin", Counter())
    add(f"  jobs in the database: {sum(origin.values())} — "
        + ", ".join(f"{k} {v}" for k, v in sorted(origin.items())))
    for phase in ("chaos", "auto-resumed", "orphan"):
        outcome = info.get(f"outcome:{phase}")
        if not outcome:
            continue
        add(f"  outcomes ({phase}):")
        for (status, reason, source), n in sorted(outcome.items(), key=lambda kv: (-kv[1], str(kv[0]))):
            add(f"    {status:<10} {reason or '':<18} {source or '':<16} {n:>5}")
    add(f"  untouched jobs (no stop path, no deadline): {info.get('untouched', Counter())['completed']} — all "
        "must end completed")
    if info.get("auto-resume"):
        add(f"  auto-resumed after a warm restart: {info['auto-resume']['resumed']} jobs")
    if info.get("celery-state"):
        add("  Celery result state by row status: " + ", ".join(
            f"{status}→{state} {n}" for (status, state), n in sorted(info["celery-state"].items(), key=str)))
    if info.get("parked"):
        add("  task messages parked in kombu's `unacked` hash after the run (redelivered only after the 12 h "
            "visibility timeout): " + ", ".join(f"row {k} {v}" for k, v in sorted(info["parked"].items())))
    if info.get("celery-state-outage"):
        add("  ended during the Redis outage, so Celery stored FAILURE (ConnectionError; reported, not a violation): " +
            ", ".join(f"{status}→{state} {n}" for (status, state), n in info["celery-state-outage"].items()))
    cleanup = Counter((e.detail or {}).get("errors", ["?"])[0].split(":")[0] + ": " +
                      (e.detail or {}).get("errors", ["?"])[0].split(":")[1].strip()
                      for e in events if e.kind == "cleanup_failed")
    if cleanup:
        add("  cleanup_failed events (recorded, not violations): "
            + ", ".join(f"{k} ×{v}" for k, v in cleanup.items()))
    if info.get("kills"):
        for k, v in info["kills"].items():
            add(f"  kills: {k}: {v}")
    add("")
    add(f"phase 2 — cancel vs complete: {race.get('jobs', 0)} one-item jobs, no delay, each cancelled through the "
        f"service layer with a random reason ({', '.join(f'{k} {v}' for k, v in sorted(race_how(h).items()))}); "
        f"{fmt_s(h.phase_times.get('race', 0))}")
    for key in ("cancelled", "cancelled while queued (never ran)", "cancelled while running (at a checkpoint)",
                "completed", "completed: the cancel came after the end (400)",
                "completed: the cancel lost to completion", "failed", "two terminal states",
                "ended without starting (unexpected)"):
        if race.get(key):
            add(f"    {key:<50} {race[key]:>5}")
    for how in ("at once", "once running", "random offset"):
        split = {k[2]: n for k, n in race.items() if isinstance(k, tuple) and k[1] == how}
        if split:
            add(f"    cancelled {how + ':':<15} " + ", ".join(f"{k} {v}" for k, v in sorted(split.items())))
    add("")
    grouped: dict[str, list] = defaultdict(list)
    for check, job_id, msg in violations:
        grouped[check].append((job_id, msg))
    by_id = {j.id: j for j in jobs}
    kinds: dict[str, list[str]] = defaultdict(list)
    for ev in sorted(events, key=lambda e: e.id):
        if ev.job_id in leftovers_dirs:
            kinds[ev.job_id].append(ev.kind + (f"({ev.detail.get('status')})" if ev.kind == "cancel_requested"
                                               and ev.detail else ""))
    for d in leftovers_dirs:
        job = by_id.get(d)
        grouped["temp-dirs"].append((d, f"$ANDON_HOME/tmp/jobs/{d} left behind; job "
                                        f"{job.status if job else '?'}, events {kinds.get(d)}"))
    for p in leftover_procs:
        grouped["processes"].append(("-", p))
    for n in h.notes:
        grouped["harness"].append(("-", n))
    add("checks:")
    for check, meaning in CHECKS.items():
        found = grouped.get(check, [])
        add(f"  {'ok  ' if not found else 'FAIL'} {meaning}" + (f"  — {len(found)} violation(s)" if found else ""))
    total = sum(len(v) for v in grouped.values())
    add("")
    if total:
        add(f"VIOLATIONS: {total}")
        for check, found in grouped.items():
            add(f"  [{check}] {len(found)}:")
            for job_id, msg in found[:8]:
                add(f"    {job_id}: {msg}")
            if len(found) > 8:
                add(f"    ... and {len(found) - 8} more")
    else:
        add("no violations")
    add("=" * 100)
    return "\n".join(lines), total


# ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, help="phase 1 jobs (default 320)")
    parser.add_argument("--race", type=int, help="phase 2 cancel-vs-complete jobs (default 1000)")
    parser.add_argument("--seed", type=int, help="random seed (default: from the clock; printed)")
    parser.add_argument("--quick", action="store_true", help="80 jobs and 200 races (a smoke run)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary ANDON_HOME even if all passed")
    parser.add_argument("--budget-s", type=float, help="hard bound on the whole run (default 600)")
    args = parser.parse_args(argv)
    plan = Plan.quick() if args.quick else Plan()
    if args.jobs is not None:
        plan.jobs = args.jobs
    if args.race is not None:
        plan.race = args.race
    if args.budget_s:
        plan.budget_s = args.budget_s
    seed = args.seed if args.seed is not None else int(time.time()) % 100000

    home = Path(tempfile.mkdtemp(prefix="andon-chaos-"))
    ports = {"redis": _free_port(), "api": _free_port(), "flower": _free_port()}
    flower_auth = f"chaos:{secrets.token_urlsafe(12)}"
    configure_env(home, ports["redis"], flower_auth)

    from chaos.checks import check_rows, race_summary
    from chaos.procs import leftover_processes

    h = Harness(plan, seed, home, ports, flower_auth)
    started = time.monotonic()

    def watchdog() -> None:  # the hard bound: whatever hangs, the run ends and leaves nothing behind
        time.sleep(plan.budget_s)
        say(f"BUDGET of {plan.budget_s:.0f}s EXCEEDED: stopping everything")
        try:
            h.stack.stop()
        finally:
            print(f"logs kept in {home}", flush=True)
            os._exit(2)

    threading.Thread(target=watchdog, daemon=True).start()

    def on_sigterm(_signum, _frame):  # stopped from outside: still stop the stack (its own sessions)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    code = 0
    try:
        h.start()
        h.run_chaos()
        h.run_race()
        say("checking every row")
        leftovers_dirs = h.leftover_dirs()
        jobs, items, events = h.load_rows()
        partials = h.fetch_partials([j.id for j in jobs])
        states = h.celery_states(jobs)
        parked = h.parked_messages()
        violations, info = check_rows(h.record, jobs, items, events, partials, states, parked, h.celery_meta)
        race = race_summary(h.record, jobs, events)
    except KeyboardInterrupt:
        say("interrupted: stopping the stack")
        h.stack.stop()
        print(f"logs kept in {home}", flush=True)
        return 130
    except Exception:
        say("the harness failed:\n" + traceback.format_exc())
        h.stack.stop()
        print(f"logs kept in {home}", flush=True)
        return 2
    say("stopping the stack")
    known = h.stack.all_pids()
    h.stack.stop()
    time.sleep(0.5)
    procs = leftover_processes(home, known)
    text, total = report(h, jobs, events, violations, info, race, leftovers_dirs, procs,
                         time.monotonic() - started)
    print(text, flush=True)
    (home / "chaos-report.txt").write_text(text + "\n")
    (home / "violations.json").write_text(json.dumps(
        [{"check": c, "job_id": j, "message": m} for c, j, m in violations], indent=1))
    (home / "actions.json").write_text(json.dumps({  # what the harness did, for a look at a violation
        "actions": [{"kind": a.kind, "job_id": a.job_id, "at": a.at.isoformat(), "reason": a.reason,
                     "source": a.source, "result": a.result, "pid": a.pid} for a in h.record.actions],
        "restarts": [{k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in r.items()}
                     for r in h.record.restarts],
        "redis_restart": [t.isoformat() for t in h.record.redis_restart] if h.record.redis_restart else None,
    }, indent=1))
    if total:
        code = 1
    if total or args.keep:
        print(f"logs, database and report kept in {home}", flush=True)
    else:
        shutil.rmtree(home, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
